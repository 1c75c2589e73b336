"""Rule-based peak shaving ends the horizon with the energy the plan must leave."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from derms.der.models import Battery, Connection, Fleet, Horizon, fleet_arrays
from derms.dispatch.baselines import battery_energy, rule_based_peak_shaving

T0 = datetime(2026, 7, 1, 12, tzinfo=UTC)
C = Connection("b1", (1, 0), 1, 2.4)


def fleet(T: int, soc0: float = 0.5) -> Fleet:
    h = Horizon(T0, timedelta(hours=1), T)
    bats = (Battery("b1", C, 50.0, 100.0, soc0_frac=soc0, soc_min_frac=0.1),
            Battery("b2", C, 100.0, 100.0, soc0_frac=soc0, soc_min_frac=0.1))
    return Fleet(h, (), bats)


def test_batteries_end_with_the_plans_end_energy_recharged_in_the_valley():
    """An independent sweep: 6 h horizon, SOC 50 % -> 14 % at the end while the plan keeps
    50 %; the baseline's peak looked better than it can be sustained."""
    # the valley is above 0.8 x threshold: the threshold rule alone never recharges
    head = np.array([100, 120, 130, 125, 90, 85, 95, 90], dtype=float)
    f = fleet(head.size)
    a = fleet_arrays(f)
    s = rule_based_peak_shaving(f, head, threshold_kw=100.0)
    np.testing.assert_allclose(s.e_kwh[-1], a.bat_e_end_min_kwh, atol=1e-9)
    np.testing.assert_allclose(s.e_kwh, battery_energy(a, s.charge_kw, s.discharge_kw))
    assert (s.e_kwh >= a.bat_e_min_kwh - 1e-9).all()
    assert (s.e_kwh <= a.bat_e_max_kwh + 1e-9).all()
    net = head + (s.charge_kw - s.discharge_kw).sum(axis=1)
    # the peak is shaved (discharge untouched); the recharge keeps below the threshold
    np.testing.assert_allclose(net[:2], 100.0)
    assert (net[4:] <= 100.0 + 1e-9).all() and s.charge_kw[4:].sum() > 30.0
    # what the valley cannot put back is discharged less at the end of the peak
    assert (net[2:4] > 100.0).all()


def test_without_a_valley_the_batteries_discharge_less():
    head = np.array([130, 140, 150, 150], dtype=float)  # above the threshold throughout
    f = fleet(head.size)
    a = fleet_arrays(f)
    s = rule_based_peak_shaving(f, head, threshold_kw=100.0)
    np.testing.assert_allclose(s.e_kwh[-1], a.bat_e_end_min_kwh, atol=1e-9)
    assert (s.charge_kw == 0).all()
    # nothing can be put back: nothing is taken out
    np.testing.assert_allclose(s.discharge_kw, 0.0, atol=1e-9)


def test_a_short_valley_recharges_what_it_can_and_cuts_the_latest_discharge():
    head = np.array([130, 140, 60, 150, 120], dtype=float)
    f = fleet(head.size)
    a = fleet_arrays(f)
    s = rule_based_peak_shaving(f, head, threshold_kw=100.0)
    np.testing.assert_allclose(s.e_kwh[-1], a.bat_e_end_min_kwh, atol=1e-9)
    net = head + (s.charge_kw - s.discharge_kw).sum(axis=1)
    assert net[2] == pytest.approx(100.0)  # the valley filled to the threshold
    assert net[0] == pytest.approx(100.0)  # the first peak still shaved
    assert s.discharge_kw[-1].sum() < 20.0  # the last one cut


def test_a_peak_above_the_uncontrolled_one_is_explained():
    """An independent sweep: IEEE 123 with an export limit, optimised peak 0.1 kW above
    the uncontrolled one and no note."""
    from types import SimpleNamespace

    import pandas as pd

    from derms.dispatch.ledger import Ledger
    from derms.reports.dispatch_study import peak_rise_note

    h = Horizon(T0, timedelta(hours=1), 4)
    planner = SimpleNamespace(fleet=SimpleNamespace(horizon=h), x=np.array([0.0, 99.0]),
                              lay=SimpleNamespace(z=1))
    vp = SimpleNamespace(planner=planner)
    empty = pd.DataFrame(columns=["t", "kind", "element", "limit", "value", "dual"])
    unc, opt = np.array([90.0, 100.0, 80, 70]), np.array([95.0, 99.0, 100.2, 70])
    led = Ledger(empty, pd.DataFrame(), pd.DataFrame())
    assert peak_rise_note(unc, np.array([95.0, 100.04, 80, 70]), vp, led) is None
    note = peak_rise_note(unc, opt, vp, led)
    assert "100.2 kW (2026-07-01T14:00:00Z) is 0.2 kW above the uncontrolled 100.0" in note
    assert "planned a peak of 99.0 kW" in note
    bind = pd.DataFrame({"t": [pd.Timestamp(T0 + timedelta(hours=2))] * 2,
                         "kind": ["i_max", "export_limit"], "element": ["line.l1", "head"],
                         "limit": [1.0, 2.0], "value": [1.0, 2.0], "dual": [0.1, -3.0]})
    note = peak_rise_note(unc, opt, vp, Ledger(bind, pd.DataFrame(), pd.DataFrame()))
    assert note.endswith("(export_limit head, i_max line.l1)")
