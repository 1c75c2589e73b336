"""Network-constrained dispatch on IEEE 123 (real OpenDSS): the uncontrolled scenario has
violations, the optimised plan has none in the AC simulation; curtailment policies hold
under a binding export limit; impossible requests raise InfeasibleError with numbers."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest

from derms.der.models import DERGroup, GroupRequest
from derms.dispatch import baselines
from derms.dispatch.ledger import build_ledger, policy_deviation_pct
from derms.dispatch.plan import ObjectiveConfig, Planner, uncontrolled_schedule
from derms.dispatch.verify import plan_and_verify
from derms.errors import InfeasibleError
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case
from tests.conftest import shared_master


@pytest.fixture(scope="module")
def case():
    engine, scenario, ac = open_dispatch_case(shared_master("ieee123"), ScenarioConfig())
    unc = uncontrolled_schedule(scenario.fleet)
    yield scenario, ac, unc, ac.reference(unc)
    engine.close()


def test_plan_removes_every_ac_violation_and_lowers_the_peak(case):
    scenario, ac, unc, (ref, res) = case
    f = scenario.fleet
    assert (len(f.pv), len(f.batteries), len(f.evs)) == (27, 23, 18)  # 30/25/20 % of 91
    before = ac.violations(res).counts
    assert before["violations_voltage"] + before["violations_thermal"] > 0
    vp = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=(ref, res))
    assert vp.clean, vp.violations.counts
    peak_unc = res.head_p_kw.sum(axis=1).max()
    assert vp.result.head_p_kw.sum(axis=1).max() < peak_unc - 100.0
    assert vp.timing_s["total_s"] < 5.0  # target 1 s; generous under a loaded CI machine
    # the schedule keeps the DER limits: EV energy by departure, SOC bounds
    s = vp.schedule
    a = vp.planner.arrays
    np.testing.assert_allclose((s.ev_kw * a.ev_eta * a.dt_h).sum(axis=0),
                               a.ev_e_required_kwh, rtol=1e-6, atol=1e-6)
    assert (s.e_kwh >= a.bat_e_min_kwh - 1e-6).all()
    assert (s.e_kwh[-1] >= a.bat_e_end_min_kwh - 1e-6).all()
    ledger = build_ledger(vp.planner, s, unc, vp.result)
    assert len(ledger.binding) and len(ledger.moves)
    assert ledger.moves["reason"].str.contains("peak").any()


def test_rule_based_baseline_is_simulated(case):
    scenario, ac, _unc, (_ref, res) = case
    head = res.head_p_kw.sum(axis=1)
    rb = baselines.rule_based_peak_shaving(scenario.fleet, head, 0.9 * head.max())
    out = ac.simulate(rb.p_kw, rb.q_kvar)
    assert out.converged.all()
    assert out.head_p_kw.sum(axis=1).max() <= head.max() + 1.0


@pytest.mark.parametrize("policy", ["equal_proportional", "proportional_to_capacity"])
def test_curtailment_follows_policy_under_binding_export_limit(policy):
    cfg = ScenarioConfig(pv_penetration=0.6, pv_size_min=1.5, pv_size_max=3.0)
    engine, _scenario, ac = open_dispatch_case(shared_master("ieee123"), cfg)
    try:
        vp = plan_and_verify(ac, ObjectiveConfig(export_limit_kw=300.0,
                                                 curtailment_policy=policy))
        assert vp.clean
        assert vp.schedule.curtail_kw.sum() > 100.0  # the export limit binds
        assert -vp.result.head_p_kw.sum(axis=1).min() <= 300.0 + 0.5
        assert policy_deviation_pct(vp.schedule, policy) < 1.0
    finally:
        engine.close()


def test_impossible_ev_session_is_explained(case):
    scenario, ac, _, (ref, _) = case
    ev = scenario.fleet.evs[0]
    bad = replace(ev, departure=ev.arrival + timedelta(hours=1), e_needed_kwh=50.0)
    fleet = replace(scenario.fleet, evs=(bad, *scenario.fleet.evs[1:]))
    with pytest.raises(InfeasibleError, match=rf"EV {ev.der_id}: needs 50.00 kWh .* at most"):
        Planner(fleet, ac.grid_context(ref), ObjectiveConfig())


def test_group_asked_beyond_capability_is_explained(case):
    scenario, ac, _, (ref, _) = case
    f = scenario.fleet
    members = tuple(b.der_id for b in f.batteries[:3])
    cap = sum(b.p_max_kw for b in f.batteries[:3])
    h = f.horizon
    fleet = replace(f, groups=(DERGroup("vpp1", members),),
                    requests=(GroupRequest("vpp1", h.start + timedelta(hours=6),
                                           h.start + timedelta(hours=7), cap + 5.0),))
    with pytest.raises(InfeasibleError, match=r"group vpp1: asked for .* at most"):
        Planner(fleet, ac.grid_context(ref), ObjectiveConfig())
    # within power but beyond energy: the LP's relaxation names the group request
    e_req = replace(fleet, requests=(GroupRequest("vpp1", h.start, h.end, 0.9 * cap),))
    with pytest.raises(InfeasibleError, match=r"group_request vpp1"):
        Planner(e_req, ac.grid_context(ref), ObjectiveConfig()).solve_linear()


def test_losses_and_element_peak_objectives(case):
    _scenario, ac, unc, (ref, res) = case
    base = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=(ref, res))
    lossy = plan_and_verify(ac, ObjectiveConfig(loss_weight=0.5), uncontrolled=(ref, res))
    assert lossy.clean
    assert lossy.result.losses_kw.sum() < base.result.losses_kw.sum()
    el = "line.l67"
    vp = plan_and_verify(ac, ObjectiveConfig(peak_element=el, peak_element_weight=5.0),
                         uncontrolled=(ref, res))
    assert vp.clean
    ref_u, _ = ac.reference(unc)
    ref_p, _ = ac.reference(vp.schedule, vp.result)
    assert ref_p.element_kw[el].max() < ref_u.element_kw[el].max() - 10.0


def test_every_simulation_starts_from_the_same_control_state(case):
    """The same schedule simulated twice, with another run in between that leaves the
    regulators elsewhere, gives the same AC result (taps used to carry over between
    runs, so a plan's AC check and its reference started from different taps)."""
    _scenario, ac, unc, _ref = case
    first = ac.simulate(unc.p_kw, unc.q_kvar)
    heavy = np.full_like(unc.p_kw, 40.0)          # every DER importing 40 kW
    ac.simulate(heavy, unc.q_kvar)
    again = ac.simulate(unc.p_kw, unc.q_kvar)
    np.testing.assert_array_equal(first.v_pu, again.v_pu)
    np.testing.assert_array_equal(first.head_p_kw, again.head_p_kw)


def test_operating_point_sensitivities_serve_the_nearest_intervals(case):
    """Row sensitivities at 3 operating points of the uncontrolled QSTS: cached per
    reference; every interval is served by the point nearest in head import; at its own
    interval each part predicts the AC response to one DER's 20 kW export at least as well
    as the nominal-load model does."""
    from derms.dispatch.network import der_sensitivity, times_t

    _scenario, ac, unc, (ref, res) = case
    ss = ac.operating_points(ref, 3)
    assert ss is ac.operating_points(ref, 3) and len(ss.parts) == 3 and ss.at.size == 3
    head = ref.head_kw
    dist = np.abs(head[:, None] - head[ss.at][None, :])
    np.testing.assert_array_equal(dist[np.arange(head.size), ss.of_t], dist.min(axis=1))
    j = len(unc.fleet.pv)                              # the first battery
    p = unc.p_kw.copy()
    p[:, j] -= 20.0
    moved = ac.simulate(p, unc.q_kvar)
    dp = np.zeros_like(p)
    dp[:, j] = -20.0
    base = der_sensitivity(ac.lin, ac.fleet)
    for c, t in enumerate(ss.at):
        v0, dv_ac = res.v_pu[t], moved.v_pu[t] - res.v_pu[t]
        live = np.abs(dv_ac) > 1e-4
        err = {}
        for name, s in (("part", ss.parts[c]), ("base", base)):
            u = times_t(dp[t:t + 1], s.hv_p)[0]
            err[name] = np.abs(np.sqrt(v0**2 + 2 * v0 * u) - v0 - dv_ac)[live].max()
        assert err["part"] <= 1.05 * err["base"] + 1e-5, (t, err)


@pytest.mark.parametrize(("feeder", "seed"), [("bundled:ieee13", 1), ("ieee123", 0)])
def test_evs_at_every_customer_get_a_plan_not_a_refusal(feeder, seed):
    """EVs only, at every customer (an independent sweep's case): the linear model from
    the uncontrolled reference (every EV charging) put even every EV idle beyond a limit
    (the bundled IEEE 13: 0.016 A over line 650632's held base value; IEEE 123: 4-5 A
    over sw1's), so the LP was infeasible and the study refused, though idle is the base
    case. The network rows are now made elastic once and the AC check decides."""
    from derms.grid.bundled import resolve_master

    master = resolve_master(feeder[8:]) if feeder.startswith("bundled:") else \
        shared_master(feeder)
    engine, scenario, ac = open_dispatch_case(
        master, ScenarioConfig(pv_penetration=0.0, battery_penetration=0.0,
                               ev_penetration=1.0, seed=seed))
    try:
        unc = ac.reference(uncontrolled_schedule(scenario.fleet))
        vp = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=unc)
        assert vp.clean, (vp.violations.counts, vp.notes)
        assert any("made elastic" in n for n in vp.notes), vp.notes
        a = vp.planner.arrays  # every EV still gets its energy
        np.testing.assert_allclose((vp.schedule.ev_kw * a.ev_eta * a.dt_h).sum(axis=0),
                                   a.ev_e_required_kwh, rtol=1e-6, atol=1e-6)
    finally:
        engine.close()
