"""fit_load_level: the common factors on the pseudo loads that match the head's metered
P and Q, on synthetic heads (a feeder whose losses grow with the square of the load and
whose capacitors' Q falls as the load rises)."""

from __future__ import annotations

import numpy as np
import pytest

from derms.analysis.se_level import LEVEL_P_MIN, LEVEL_STEP, MAX_SOLVES, fit_load_level

P0, Q0 = 5000.0, 1500.0


def feeder(kp: float, kq: float) -> tuple[float, float]:
    s2 = (P0 * kp) ** 2 + (Q0 * kq) ** 2
    p = P0 * kp + 2e-6 * s2
    q = Q0 * kq + 8e-6 * s2 - 900.0 * (1.0 + 0.05 * (1.0 - kp))  # capacitors
    return p, q


@pytest.mark.parametrize(("kp", "kq"), [(0.5, 0.5), (1.3, 1.3), (0.7, 0.9), (2.0, 1.6)])
def test_recovers_the_level_within_one_step(kp, kq):
    calls = []

    def head(a, b):
        calls.append((a, b))
        return feeder(a, b)

    zp, zq = feeder(kp, kq)
    lv = fit_load_level(head, zp, zq, 0.01 * zp, 0.01 * abs(zq))
    assert lv.changed
    assert abs(lv.p - kp) <= LEVEL_STEP / 2 + 1e-9 and abs(lv.q - kq) <= LEVEL_STEP / 2 + 1e-9
    assert lv.solves == len(calls) <= MAX_SOLVES


def test_no_change_within_the_heads_noise():
    zp, zq = feeder(1.01, 1.0)  # 1 % off: within 3 sigma of a 1 % meter
    lv = fit_load_level(feeder, zp, zq, 0.01 * zp, 0.01 * abs(zq))
    assert not lv.changed and lv.solves == 1


def test_q_tied_to_p_where_the_loads_carry_no_q():
    def head(kp, kq):
        return P0 * kp, 200.0 + 1e-3 * kq  # Q does not move with the loads

    lv = fit_load_level(head, P0 * 0.6, 150.0, 0.01 * P0 * 0.6, 2.0)
    assert lv.p == pytest.approx(0.6) and lv.q == lv.p


def test_factors_stay_in_range_and_an_unmovable_head_is_left_alone():
    lv = fit_load_level(lambda a, b: (P0 * a, Q0 * b), 1e9, Q0, 10.0, 10.0)
    assert lv.unexplained and not lv.changed  # no level in range explains it: none applied
    lv = fit_load_level(lambda a, b: (1.0, 1.0), 100.0, 100.0, 1.0, 1.0)
    assert not lv.changed


def test_the_level_is_rounded_to_its_step():
    zp, zq = feeder(0.613, 0.613)
    lv = fit_load_level(feeder, zp, zq, 1.0, 1.0)
    assert np.isclose(lv.p / LEVEL_STEP, round(lv.p / LEVEL_STEP))


def test_a_mismatch_below_half_a_step_of_the_loads_costs_one_solve():
    calls = []

    def head(a, b):
        calls.append((a, b))
        return feeder(a, b)

    zp, zq = feeder(1.005, 1.0)
    lv = fit_load_level(head, zp, zq, 1.0, 1.0, free_p_kw=P0, free_q_kvar=Q0)
    assert not lv.changed and len(calls) == 1


def test_net_export_is_a_negative_p_level_and_q_keeps_its_own():
    """Unmodelled PV exporting (head import negative): the loads as a whole export, a P
    level below 0, while Q keeps its own level (PV at unity power factor leaves the
    loads' Q). Before, the P range ended at 0.02: the fit went to its floor and pushed Q
    to make up for it, so nothing was applied."""
    zp, zq = feeder(-0.4, 0.5)
    assert zp < 0
    lv = fit_load_level(feeder, zp, zq, 0.01 * abs(zp), 0.01 * abs(zq))
    assert lv.changed and not lv.unexplained
    assert abs(lv.p + 0.4) <= LEVEL_STEP / 2 + 1e-9 and abs(lv.q - 0.5) <= LEVEL_STEP / 2 + 1e-9


def test_export_beyond_the_p_range_is_not_applied():
    lv = fit_load_level(feeder, feeder(LEVEL_P_MIN - 2.0, 1.0)[0], feeder(1.0, 1.0)[1],
                        50.0, 15.0)
    assert lv.unexplained and not lv.changed and lv.mismatch_sigmas > 10


def test_q_not_fitted_keeps_q_where_p_exports():
    def head(kp, kq):
        return P0 * kp, 200.0 + 1e-3 * kq  # Q does not move with the loads

    lv = fit_load_level(head, -0.3 * P0, 150.0, 0.01 * 0.3 * P0, 2.0)
    assert lv.p == pytest.approx(-0.3) and lv.q == 1.0  # not tied to a negative P level


def test_p_explained_q_not_keeps_the_power_factor():
    def head(kp, kq):
        return P0 * kp, 300.0 + 0.0 * kq + Q0 * kq  # Q moves, but the reading is off

    zp = P0 * 0.7
    lv = fit_load_level(head, zp, -5000.0, 0.01 * zp, 5.0)
    assert lv.changed and lv.p == lv.q == pytest.approx(0.7)


@pytest.mark.parametrize("kp", [-2.5, -4.0])
def test_net_export_of_a_few_times_the_load_is_fitted(kp):
    """Rooftop PV at noon on a residential LV feeder exports a few times the customers'
    nominal load (European LV case through `derms serve`, truth P x -2.5: the level was
    capped at -2, not applied at all, and the estimate was 0.0122 pu off, 12 points of
    loading; with the level fitted 0.0025 pu, 1.8 points)."""
    zp, zq = feeder(kp, 1.0)
    lv = fit_load_level(feeder, zp, zq, 0.01 * abs(zp), 0.01 * abs(zq))
    assert lv.changed and not lv.unexplained
    assert abs(lv.p - kp) <= LEVEL_STEP / 2 + 1e-9
