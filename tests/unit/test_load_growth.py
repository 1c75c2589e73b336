"""Rules of the load-growth scenario: adoption, seeds, device profiles, input checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from derms.errors import InputError
from derms.studies.growth_profiles import (
    Adoption,
    EVParams,
    GrowthScenario,
    HeatPumpParams,
    NewConnection,
    draw_customers,
    ev_profiles_kw,
    heat_pump_pu,
    pv_pu,
)
from derms.studies.load_growth import _first_exceeded

LOADS_KW = np.array([40.0, 20.0, 3.9, 5.2, 160.0, 0.0])


def _owners(sc: GrowthScenario, tech: str, n: int) -> list[set[int]]:
    c = draw_customers(LOADS_KW, sc)
    rank = getattr(c, f"{tech}_rank")
    return [set(np.flatnonzero(rank < k)) for k in sc.adopted(tech, n)]


def test_logistic_adoption_hits_both_ends_and_is_monotonic():
    a = Adoption.logistic(0.05, 0.6, 10)
    s = np.array(a.shares)
    assert len(s) == 11 and s[0] == pytest.approx(0.05) and s[-1] == pytest.approx(0.6)
    assert (np.diff(s) > 0).all()


@pytest.mark.parametrize("tech", ["ev", "hp", "pv"])
def test_adoption_is_cumulative_and_stable(tech):
    sc = GrowthScenario.simple(10, ev_final=0.7, hp_final=0.5, pv_final=0.9, seed=4)
    n = draw_customers(LOADS_KW, sc).n
    owners = _owners(sc, tech, n)
    for earlier, later in itertools.pairwise(owners):
        assert earlier <= later  # whoever adopted keeps the device
    final = {"ev": 0.7, "hp": 0.5, "pv": 0.9}[tech]
    assert len(owners[-1]) == round(final * n) and len(owners[0]) == 0


def test_customers_split_loads_by_customer_peak():
    c = draw_customers(LOADS_KW, GrowthScenario.simple(5, customer_peak_kw=10.0))
    counts = np.bincount(c.load, minlength=len(LOADS_KW))
    assert counts.tolist() == [4, 2, 1, 1, 16, 0]  # a 0 kW load has no customers
    assert np.bincount(c.load, c.peak_kw, minlength=len(LOADS_KW)) == pytest.approx(LOADS_KW)


def test_seed_reproducible_and_seed_matters():
    a = draw_customers(LOADS_KW, GrowthScenario.simple(5, seed=3))
    b = draw_customers(LOADS_KW, GrowthScenario.simple(5, seed=3))
    c = draw_customers(LOADS_KW, GrowthScenario.simple(5, seed=4))
    for field in ("ev_rank", "hp_rank", "pv_rank", "hp_kw", "pv_kw", "ev_kw"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.ev_rank, c.ev_rank)


def test_ev_profile_energy_and_evening_peak():
    p = EVParams()
    kw = ev_profiles_kw(np.full(300, 7.4), np.random.default_rng(0), p, steps_per_day=24)
    assert kw.shape == (300, 365 * 24) and kw.min() >= 0 and kw.max() <= 7.4 + 1e-5
    per_day = kw.sum(axis=1).mean() / 365  # kWh per day with hourly steps
    assert per_day == pytest.approx(p.e_kwh_day_mean * p.plug_in_prob, rel=0.05)
    by_hour = kw.mean(axis=0).reshape(365, 24).mean(axis=0)
    assert 17 <= by_hour.argmax() <= 21 and by_hour[10] < 0.01


def test_ev_energy_is_exact_across_step_sizes():
    p = EVParams(plug_in_prob=1.0)
    h = ev_profiles_kw(np.full(5, 7.4), np.random.default_rng(1), p, steps_per_day=24)
    q = ev_profiles_kw(np.full(5, 7.4), np.random.default_rng(1), p, steps_per_day=96)
    np.testing.assert_allclose(h.sum(axis=1), q.sum(axis=1) / 4, rtol=1e-5)
    np.testing.assert_allclose(h, q.reshape(5, -1, 4).mean(axis=2), atol=1e-4)


def test_heat_pump_follows_temperature():
    t = np.array([-10.0, 0.0, 10.0, 15.0, 20.0])
    pu = heat_pump_pu(t, np.array([15.5]), HeatPumpParams())[:, 0]
    assert (np.diff(pu) <= 0).all() and pu[-1] == 0 and pu[0] <= 1.0 and pu[0] > 0.5


def test_measured_pv_is_per_unit_and_daytime():
    pv = pv_pu(24)
    assert pv.shape == (8760,) and pv.min() >= 0 and pv.max() <= 1
    day = pv.reshape(365, 24).mean(axis=0)
    assert day[:5].max() < 0.01 and day[10:13].min() > 0.4
    assert 0.12 < pv.mean() < 0.25  # capacity factor of a fixed array in Colorado


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({"years": 0}, ["years", "0"]),
    ({"growth_pct": 75.0}, ["growth_pct", "75.0"]),
    ({"step_min": 7}, ["step_min", "7"]),
    ({"customer_peak_kw": -1.0}, ["customer_peak_kw", "-1.0"]),
    ({"ev": Adoption((0.0, 0.5, 0.4))}, ["ev.shares", "non-decreasing"]),
    ({"pv": Adoption((0.0, 1.5, 1.5))}, ["pv.shares", "1.5"]),
    ({"hp": Adoption((0.0, 0.1))}, ["hp.shares", "3 values"]),
    ({"new_connections": (NewConnection("675", -5.0, "ev", 2027),)},
     ["new_connections[0].p_kw", "-5.0"]),
    ({"new_connections": (NewConnection("675", 5.0, "rocket", 2027),)},
     ["new_connections[0].profile", "rocket"]),
    ({"new_connections": (NewConnection("675", 5.0, "ev", 2040),)},
     ["new_connections[0].year", "2040"]),
])
def test_bad_scenario_raises_input_error_naming_field_and_value(kwargs, fragments):
    base = {"years": 2, "start_year": 2026}
    with pytest.raises(InputError) as err:
        GrowthScenario(**{**base, **kwargs})
    for frag in fragments:
        assert frag in str(err.value)


def test_simple_rejects_bad_final_share():
    with pytest.raises(InputError, match=r"ev final share.*1\.2"):
        GrowthScenario.simple(5, ev_final=1.2)


def test_first_exceeded_holds_pre_existing_to_base_value():
    # thermal loading per year: new violation in year 2; pre-existing worse only in year 3
    values = np.array([[50.0, 90.0, 105.0, 120.0],
                       [110.0, 110.5, 110.9, 112.0],
                       [110.0, 109.0, 108.0, 100.0]])
    first, val, pre = _first_exceeded(values, lambda v: v > 101.0,
                                      lambda v, b: v > b + 1.0, worst_is_max=True)
    assert first.tolist() == [2, 3, -1]
    assert val.tolist() == [105.0, 112.0, 110.0]
    assert pre.tolist() == [False, True, True]


def test_warmup_runs_merge_overlapping_windows_and_flag_restarts():
    from derms.studies.load_growth import warmup_runs

    solve, start, cand = warmup_runs(np.array([10, 12, 40, 2]), 3, stride=2)
    assert solve.tolist() == [0, 2, 4, 6, 8, 10, 12, 34, 36, 38, 40]
    assert solve[start].tolist() == [0, 4, 34]   # 2's window [0, 2]; 10 and 12 share one
    assert solve[cand].tolist() == [2, 10, 12, 40]
    solve, start, cand = warmup_runs(np.array([5]), 0)
    assert solve.tolist() == [5] and start.tolist() == [True] and cand.tolist() == [True]
