"""The short re-plans of the rolling loop are anchored to the last full plan
(:class:`derms.dispatch.rolling._Anchor`): battery energy at the short window's end from
the full plan, shifted by today's deviation, and EV energy by then; what the window
fleet then requires (``fleet_arrays``) is checked, not only the numbers handed over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from derms.der.models import Battery, Connection, EVSession, Fleet, Horizon, fleet_arrays
from derms.dispatch.plan import uncontrolled_schedule
from derms.dispatch.rolling import _Anchor, _window_fleet

T0 = datetime(2026, 7, 1, tzinfo=UTC)
DT = timedelta(minutes=15)
CON = Connection("b1", (1,), 1, 0.24)


def _fleet() -> Fleet:
    h = Horizon(T0, DT, 96)
    bats = (Battery("b1", CON, p_max_kw=4.0, e_max_kwh=10.0, soc0_frac=0.5),
            Battery("b2", CON, p_max_kw=2.0, e_max_kwh=8.0, soc0_frac=0.5))
    evs = (EVSession("late", CON, T0 + 2 * DT, T0 + 40 * DT, 20.0, 7.0),   # leaves at 40
           EVSession("soon", CON, T0, T0 + 10 * DT, 5.0, 7.0))            # leaves at 10
    return Fleet(h, batteries=bats, evs=evs)


def _anchor(fleet: Fleet) -> _Anchor:
    """A full plan from interval 0: battery 1 charges 1 kWh per interval, battery 2 holds;
    EV 'late' takes 0.5 kWh per interval from its arrival, 'soon' 1 kWh."""
    s = uncontrolled_schedule(fleet)
    a = fleet_arrays(fleet)
    e = np.column_stack([5.0 + np.arange(1, 97) * 1.0, np.full(96, 4.0)]).clip(max=10.0)
    ev = np.zeros((96, 2))
    ev[2:40, 0] = 0.5 / (a.ev_eta[0] * 0.25)
    ev[0:5, 1] = 1.0 / (a.ev_eta[1] * 0.25)
    s = type(s)(**{**{f: getattr(s, f) for f in s.__dataclass_fields__}, "e_kwh": e,
                   "ev_kw": ev})
    return _Anchor.of(0, s, np.array([5.0, 4.0]), np.zeros(2), a, 0.25)


def _window(k0: int, n: int, e_now, done, need):
    """What the anchored window [k0, k0 + n) is given and what its fleet then requires."""
    fleet = _fleet()
    a = fleet_arrays(fleet)
    e_end, need_w = _anchor(fleet).terminal(k0, n, e_now, done, need, fleet, a,
                                            np.array([2, 0]), np.array([40, 10]))
    fw = _window_fleet(fleet, k0, n, np.zeros((n, 0)), e_now, need_w, e_end)
    return e_end, fleet_arrays(fw), a   # raises InfeasibleError if an EV asks too much


def test_terminal_follows_the_full_plan_shifted_by_the_deviation():
    # at interval 2 battery 1 has 6.5 kWh where the full plan had 7 (-0.5); battery 2 as
    # planned; EV 'late' got nothing yet, 'soon' 1.5 kWh of the 2 planned
    e_now, done = np.array([6.5, 4.0]), np.array([0.0, 1.5])
    need = np.array([20.0, 3.5])
    e_end, fa, _ = _window(2, 4, e_now, done, need)
    # full plan at the end of interval 5: battery 1 10 kWh (capped), 2 4 kWh; shifted
    assert e_end == pytest.approx([9.5, 4.0])
    # both leave after the window: 'late' must have 4 x 0.5 kWh by the end of interval 5,
    # 'soon' what the plan delivered by then (5 kWh) less the 1.5 it has
    assert fa.ev_e_required_kwh == pytest.approx([2.0, 3.5], abs=1e-9)
    assert fa.bat_e_end_min_kwh == pytest.approx([9.5, 4.0])


def test_terminal_stays_reachable_and_within_bounds():
    # at interval 8 battery 1 is 9 kWh below the plan (ends at its e_min, not below);
    # battery 2 4 kWh above it (ends at its e_max); EV 'late' is 4 kWh behind but is
    # asked no more than the 2-interval window can give; 'soon' leaves at the window's
    # end and keeps its whole need (the loop clips it to what it can still get)
    e_now, done = np.array([1.0, 8.0]), np.array([0.0, 0.0])
    need = np.array([20.0, 0.999 * 2 * 0.25 * 7.0 * 0.92])
    e_end, fa, a = _window(8, 2, e_now, done, need)
    assert e_end == pytest.approx([1.0, 8.0])
    can = 2 * 0.25 * 7.0 * a.ev_eta
    assert fa.ev_e_required_kwh == pytest.approx([0.999 * can[0], need[1]])


def test_an_infeasible_short_window_falls_back_to_a_full_replan(monkeypatch):
    """A short window that cannot be planned (here: every EV asked more than the window
    can give) is re-planned over the whole lookahead at the same origin, not run
    uncontrolled (IEEE 13, real OpenDSS, 6 h of 15-min re-plans)."""
    from derms.dispatch import rolling
    from derms.dispatch.plan import ObjectiveConfig
    from derms.grid.bundled import resolve_master
    from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case

    engine, sc, ac = open_dispatch_case(resolve_master("ieee13"),
                                        ScenarioConfig(n_steps=120, seed=2))
    try:
        if not sc.fleet.evs:
            pytest.skip("scenario without EVs")
        orig = rolling._Anchor.terminal

        def impossible(self, *args, **kw):
            e_end, need_w = orig(self, *args, **kw)
            return e_end, need_w + 1e6
        monkeypatch.setattr(rolling._Anchor, "terminal", impossible)
        r = rolling.run_rolling(ac, sc, ObjectiveConfig(), forecast="perfect",
                                replan_every="15min", days=0.25)
    finally:
        engine.close()
    assert r.n_replans == 24 and r.fallbacks == 0
    assert r.full_replan.all() and np.isfinite(r.target_kw_at_replan).all()


def test_the_export_hold_uses_batteries_first_then_curtails_by_the_policy():
    from types import SimpleNamespace

    from derms.dispatch.rolling import _hold_export

    a = SimpleNamespace(bat_p_max_kw=np.array([5.0, 5.0]), bat_e_max_kwh=np.array([10.0, 10.0]),
                        bat_eta_ch=np.array([1.0, 1.0]), pv_s_kva=np.array([10.0, 5.0, 5.0]))
    e = np.array([10.0, 0.0])  # the first battery is full
    ch, dis, pv = _hold_export(3.0, np.zeros(2), np.array([2.0, 0.0]), np.array([6.0, 4.0, 1.0]),
                               e, a, 0.25, "cost_minimal")
    assert dis.sum() == 0 and ch.tolist() == [0.0, 1.0] and pv.tolist() == [6.0, 4.0, 1.0]
    # batteries full: 4 kW of PV off, by policy
    full = np.array([10.0, 10.0])
    for policy, want in (("equal_proportional", [6 * 7 / 11, 4 * 7 / 11, 7 / 11]),
                         ("proportional_to_capacity", [4.0, 3.0, 0.0])):
        ch, dis, pv = _hold_export(4.0, np.zeros(2), np.zeros(2), np.array([6.0, 4.0, 1.0]),
                                   full, a, 0.25, policy)
        np.testing.assert_allclose(pv, want, atol=1e-9)
    # what a PV cannot give goes to the others by kVA
    _ch, _dis, pv = _hold_export(6.0, np.zeros(2), np.zeros(2), np.array([6.0, 4.0, 1.0]),
                                 full, a, 0.25, "proportional_to_capacity")
    np.testing.assert_allclose(pv, [6 - 3 - 1 / 3, 4 - 1.5 - 1 / 6, 0.0], atol=1e-9)


def test_the_default_replan_period_is_said_like_a_step():
    """It read "3600s" where the step was 1h ("15min" / "1h" elsewhere)."""
    from datetime import timedelta

    from derms.reports.dispatch_study import parse_replan

    assert parse_replan(None, timedelta(minutes=5)) == "15min"
    assert parse_replan(None, timedelta(hours=1)) == "1h"
    assert parse_replan(None, timedelta(minutes=20)) == "20min"
    assert parse_replan(None, timedelta(seconds=1000)) == "1000s"
