"""AC repair of a schedule's remaining violations, interval by interval (real OpenDSS):
checked against the engine's own re-simulation of the repaired schedule."""

from __future__ import annotations

import numpy as np
import pytest

from derms.der.models import fleet_arrays
from derms.dispatch.ac_repair import RepairConfig, repair_plan
from derms.dispatch.plan import uncontrolled_schedule
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case
from tests.conftest import shared_master


def _count(rep) -> int:
    return rep.counts["violations_voltage"] + rep.counts["violations_thermal"]


@pytest.fixture(scope="module")
def case():
    """IEEE 34, PV at 80 % of the customers at 1.5-2.5 x their peak, uncontrolled: 553
    overvoltages around midday."""
    engine, sc, ac = open_dispatch_case(shared_master("ieee34"), ScenarioConfig(
        seed=0, pv_penetration=0.8, pv_size_min=1.5, pv_size_max=2.5, ev_penetration=0.0))
    try:
        sched = uncontrolled_schedule(sc.fleet)
        yield ac, sched, ac.simulate(sched.p_kw, sched.q_kvar)
    finally:
        engine.close()


def test_the_repair_removes_violations_the_engine_confirms(case):
    ac, sched, res = case
    before = _count(ac.violations(res))
    assert before > 0
    out = repair_plan(ac, sched, res, RepairConfig(rounds=3))
    after = _count(out.report)
    assert after < before / 2, out.log  # measured: 553 -> 64 in 3 rounds
    # the result handed out is the engine's simulation of the schedule handed out
    again = ac.violations(ac.simulate(out.schedule.p_kw, out.schedule.q_kvar))
    assert _count(again) == after
    assert out.log[0]["violations_before"] == before


def test_only_pv_moves_and_within_its_capability(case):
    ac, sched, res = case
    out = repair_plan(ac, sched, res, RepairConfig(rounds=2))
    n_pv = len(ac.fleet.pv)
    a = fleet_arrays(ac.fleet)
    s = out.schedule
    np.testing.assert_array_equal(s.p_kw[:, n_pv:], sched.p_kw[:, n_pv:])
    np.testing.assert_array_equal(s.q_kvar[:, n_pv:], sched.q_kvar[:, n_pv:])
    assert np.all(s.pv_kw >= -1e-6) and np.all(s.pv_kw <= a.pv_avail_kw + 1e-6)
    np.testing.assert_allclose(s.pv_kw + s.curtail_kw, a.pv_avail_kw, atol=1e-6)
    q_cap = np.broadcast_to(a.pv_q_max_kvar, a.pv_avail_kw.shape)
    assert np.all(np.abs(s.q_kvar[:, :n_pv]) <= q_cap + 1e-6)
    np.testing.assert_allclose(s.p_kw[:, :n_pv], -s.pv_kw, atol=1e-9)
    assert (s.curtail_kw.sum() > 1.0) or (np.abs(s.q_kvar[:, :n_pv]).sum() > 1.0)


def test_a_clean_schedule_is_handed_back_as_it_is(case):
    ac = case[0]
    idle = uncontrolled_schedule(ac.fleet)
    z = np.zeros_like(idle.p_kw)
    clean = ac.simulate(z, z)  # no DER power at all: the base case, clean by definition
    from dataclasses import replace
    none = replace(idle, p_kw=z, q_kvar=z)
    out = repair_plan(ac, none, clean)
    assert out.schedule is none and out.result is clean and out.log == []


def test_ev_charging_moved_later_keeps_every_session_whole():
    """IEEE 123 with an EV at every customer, uncontrolled: service lines overloaded in
    the evening (76 thermal violations, measured). The repair lowers EV charging there
    and puts the same energy back later in each session, inside its window and rate."""
    from derms.grid.bundled import resolve_master

    engine, sc, ac = open_dispatch_case(resolve_master("ieee123"), ScenarioConfig(
        seed=0, ev_penetration=1.0, pv_penetration=0.3, battery_penetration=0.0))
    try:
        sched = uncontrolled_schedule(sc.fleet)
        res = ac.simulate(sched.p_kw, sched.q_kvar)
        before = ac.violations(res).counts["violations_thermal"]
        out = repair_plan(ac, sched, res, RepairConfig(rounds=2))
        after = out.report.counts["violations_thermal"]
        assert before > 50 and after <= before // 4, (before, after, out.log)  # 76 -> 2
        a = fleet_arrays(ac.fleet)
        ev = out.schedule.ev_kw
        assert np.abs(ev - sched.ev_kw).sum() > 1.0  # EVs did move
        np.testing.assert_allclose(ev.sum(axis=0), sched.ev_kw.sum(axis=0), atol=1e-9)
        assert np.all(ev >= -1e-9) and np.all(ev <= a.ev_p_max_kw + 1e-9)
        assert np.all(ev[~a.ev_window.astype(bool)] == 0.0)
        n0 = len(ac.fleet.pv) + len(ac.fleet.batteries)
        np.testing.assert_array_equal(out.schedule.p_kw[:, n0:n0 + ev.shape[1]], ev)
        again = ac.violations(ac.simulate(out.schedule.p_kw, out.schedule.q_kvar))
        assert _count(again) == _count(out.report)
    finally:
        engine.close()


def test_under_an_export_limit_pv_output_only_goes_down(case):
    """``pv_up=False`` (a plan with an export limit: the repair does not see the head's
    export): a PV's net import may only rise (curtail), never fall below the plan's;
    with ``pv_up`` it may go down to minus the available power."""
    from derms.dispatch.ac_repair_rows import RepairRows

    ac, sched, _res = case
    n_pv = len(ac.fleet.pv)
    t = int(np.argmax(sched.pv_kw.sum(axis=1)))
    p = sched.p_kw[t].copy()
    p[:n_pv] *= 0.5  # a plan that curtails half of every PV's output here
    a = fleet_arrays(ac.fleet)
    kw = {"guard_pu": 0.01, "guard_frac": 0.25, "max_guards": 10, "reg_move_pu": 0.003,
          "step_margin_pu": 0.001, "peak_kw": 1.0}
    capped = RepairRows(ac, **kw, pv_up=False).ders(t, p, sched.q_kvar[t])
    free = RepairRows(ac, **kw, pv_up=True).ders(t, p, sched.q_kvar[t])
    np.testing.assert_allclose(capped.p_min_kw[:n_pv], p[:n_pv])
    np.testing.assert_allclose(free.p_min_kw[:n_pv], -a.pv_avail_kw[t])
    np.testing.assert_allclose(capped.p_max_kw[:n_pv], 0.0)
