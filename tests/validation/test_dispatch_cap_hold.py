"""Capacitor holds of the dispatch loop (real OpenDSS, IEEE 13 with a kvar-type capacitor
control added on Cap2's feeding line): the control is read, its capacitor's effect and its
monitored kvar are linearised against the AC solve, and a capacitor whose state differs
from the base case's where it drives a violation is held there (offset reference, kvar
row on the right side of its setting). The last-mile repair puts back a capacitor the
plan switched: which (interval, capacitor) pairs, rows at the put-back state (checked
against a solve with the capacitor toggled), the engine left as found."""

from __future__ import annotations

import numpy as np
import pytest

from derms.dispatch import ac_repair_rows as rr
from derms.dispatch import control_rows as cr
from derms.dispatch.ac_repair import RepairConfig
from derms.dispatch.control_rows import HOLD_MIN_PU, cap_sensitivity
from derms.dispatch.plan import ObjectiveConfig, Planner, uncontrolled_schedule
from derms.dispatch.verify import ACNetwork
from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.dispatch_scenario import ScenarioConfig, generate_scenario

ON, OFF = 40.0, -60.0
T = 24


@pytest.fixture(scope="module")
def case():
    engine = OpenDSSEngine(resolve_master("ieee13"))
    try:
        engine.command(f"new capcontrol.cc2 capacitor=cap2 element=line.684611 terminal=1 "
                       f"type=kvar ONsetting={ON} OFFsetting={OFF}")
        sc = generate_scenario(read_feeder(engine.ctx, engine.source_master),
                               ScenarioConfig(n_steps=T, pv_penetration=1.0))
        ac = ACNetwork(engine, sc.fleet, sc.customer_profiles)
        yield engine, sc, ac
    finally:
        engine.close()


def test_kvar_control_is_read_and_recorded(case):
    _engine, _sc, ac = case
    c = ac.capctl
    assert c.n == 1 and c.name[0] == "cc2" and c.cap[0] == "cap2"
    assert c.node.tolist() == ["611.3"] and c.node_kvar.tolist() == [100.0]
    assert (c.on_kvar[0], c.off_kvar[0]) == (ON, OFF)
    assert "611.3" in ac.lin.injection_nodes
    base = ac.base
    assert base.cap_on.shape == (24, 1) and base.ctl_kvar.shape == (24, 1)
    assert set(np.unique(base.cap_on)) <= {0.0, 1.0}


def test_capacitor_effect_matches_the_ac_solve(case):
    engine, _sc, ac = case
    unc = ac.reference(uncontrolled_schedule(ac.fleet))[0]
    ac.grid_context(unc)
    s = ac._cap_parts[0]
    # the model's own operating point (base load, controls frozen): toggle the capacitor
    engine.set_control_mode("off")
    engine.command("set mode=snapshot")
    engine.command("batchedit load.der_.* enabled=no")
    try:
        cp = engine.circuit.Capacitors
        cp.Name = "cap2"
        was = list(cp.States)
        out = []
        for st in ([1], [0]):
            cp.States = st
            engine.solve()
            v = dict(zip((n.lower() for n in engine.circuit.AllNodeNames),
                         engine.circuit.AllBusVmagPu))
            out.append((v["611.3"], cr.monitored_kvar(engine, ac.capctl, ac.index)[0]))
        cp.States = was
    finally:
        engine.command("batchedit load.der_.* enabled=yes")
        engine.set_control_mode(ac.control_mode)
    k = list(ac.lin.node_names).index("611.3")
    dv_ac, dq_ac = out[0][0] - out[1][0], out[0][1] - out[1][1]
    assert dq_ac < -80  # the capacitor sits behind its monitored line
    assert s.dq[0, 0] == pytest.approx(dq_ac, rel=0.2)  # operating points differ a little
    assert s.dv[k, 0] == pytest.approx(dv_ac, rel=0.2)
    assert s.dq_q.shape == (1, len(ac.fleet.ders))


def test_a_capacitor_driving_a_violation_is_held_at_the_base_state(case):
    _engine, _sc, ac = case
    unc = ac.reference(uncontrolled_schedule(ac.fleet))[0]
    pl = Planner(ac.fleet, ac.grid_context(unc), ObjectiveConfig())
    base_on = np.zeros_like(unc.cap_on)
    hold = cr.CapHold(pl, ac.capctl, ac._cap_parts, base_on)
    k = list(ac.lin.node_names).index("611.3")
    s = ac._cap_parts[0]
    t = 10
    # the plan's AC run: capacitor on at t only, 611.3 over v_max by less than its push
    on = np.zeros_like(unc.cap_on)
    on[t] = 1.0
    push = s.dv[k, 0]
    assert push > cr.HOLD_MIN_PU
    v = unc.v_pu.copy()
    lim = ac.net_limits
    v[t, k] = lim.v_max[t, k] + 0.8 * push
    q = unc.ctl_kvar.copy()
    q[t] = OFF + 10.0  # after switching on: the capacitor's kvar is off the flow
    from dataclasses import replace
    ref = replace(unc, v_pu=v, cap_on=on, ctl_kvar=q)

    class Res:
        v_pu, i_a = v, unc.i_a
    over = {"v_max": np.zeros_like(v, dtype=bool), "v_min": np.zeros_like(v, dtype=bool),
            "i_max": np.zeros_like(unc.i_a, dtype=bool)}
    over["v_max"][t, k] = True
    old = cr.HOLD_REACH
    cr.HOLD_REACH = 1e9  # reach is not what this test is about
    try:
        assert hold.note(ref, over, Res, lim) == 1
    finally:
        cr.HOLD_REACH = old
    assert hold.target[t, 0] == 0.0 and hold.row[t, 0] >= 0
    off_ref = hold.offset(ref)
    assert off_ref.cap_on[t, 0] == 0.0
    assert off_ref.v_pu[t, k] == pytest.approx(v[t, k] - push)
    assert off_ref.ctl_kvar[t, 0] == pytest.approx(q[t, 0] - s.dq[0, 0])
    np.testing.assert_array_equal(off_ref.v_pu[t + 1], v[t + 1])  # other intervals as run
    hold.recenter(off_ref)
    lp = pl.lp.h.getLp()
    r = int(hold.row[t, 0])
    assert lp.row_lower_[r] == -np.inf  # stay off: kvar kept below ON
    lin_ref = s.dq_p[0] @ (off_ref.p_kw - pl.cp)[t] + s.dq_q[0] @ off_ref.q_kvar[t]
    m = cr.HOLD_MARGIN * (ON - OFF)
    assert lp.row_upper_[r] == pytest.approx(ON - m - off_ref.ctl_kvar[t, 0] + lin_ref)


def _over(ac, t: int, node: int) -> dict[str, np.ndarray]:
    n, b = ac.index.n_nodes, ac.index.n_branch_conductors
    over = {"v_max": np.zeros((T, n), bool), "v_min": np.zeros((T, n), bool),
            "i_max": np.zeros((T, b), bool)}
    over["v_max"][t, node] = True
    return over


def _with_caps(ac, caps: np.ndarray):
    """A simulation result whose recorded capacitor states are ``caps`` (T, 1)."""
    res = ac.simulate(np.zeros((T, len(ac.fleet.ders))), np.zeros((T, len(ac.fleet.ders))))
    ac._last_caps = (res, caps, ac._last_caps[2])
    return res


def test_put_back_from_the_switch_while_the_base_stays(case):
    _engine, _sc, ac = case
    part = cap_sensitivity(ac.lin, ac.der_map(), ac.capctl)
    k = list(ac.lin.node_names).index("611.3")
    assert part.dv[k, 0] > HOLD_MIN_PU  # switching Cap2 on raises 611.3
    saved = ac.base.cap_on.copy()
    try:
        ac.base.cap_on[:, 0] = 0.0  # the base case keeps Cap2 off
        caps = np.zeros((T, 1))
        caps[5:9, 0] = 1.0  # the plan switched it on at 5 and off after 8
        res = _with_caps(ac, caps)
        held = rr.cap_holds(ac, res, _over(ac, 7, k), part)
        assert np.flatnonzero(held[:, 0]).tolist() == [5, 6, 7]  # from the switch on
        # an overvoltage the capacitor does not push (relief below HOLD_MIN_PU)
        far = int(np.argmin(np.abs(part.dv[:, 0])))
        assert abs(part.dv[far, 0]) < HOLD_MIN_PU
        assert not rr.cap_holds(ac, res, _over(ac, 7, far), part).any()
        # the base case switched on at 5 and the plan kept it off: nothing to put back
        # (putting it back would ask the DERs to switch it, not to keep it)
        ac.base.cap_on[5:9, 0] = 1.0
        caps = np.zeros((T, 1))
        res = _with_caps(ac, caps)
        over = _over(ac, 7, k)
        over["v_max"][7, k], over["v_min"][7, k] = False, True  # an undervoltage there
        assert not rr.cap_holds(ac, res, over, part).any()
    finally:
        ac.base.cap_on[...] = saved


def test_rows_at_the_put_back_state_and_the_engine_left_as_found(case):
    _engine, _sc, ac = case
    part = cap_sensitivity(ac.lin, ac.der_map(), ac.capctl)
    k = list(ac.lin.node_names).index("611.3")
    sched = uncontrolled_schedule(ac.fleet)
    res = ac.simulate(sched.p_kw, sched.q_kvar)
    t = T // 2
    cfg = RepairConfig()
    # every node a guard row (guard band 1 pu), no violation: the put-back is unconditional
    rows = rr.RepairRows(ac, guard_pu=1.0, guard_frac=cfg.guard_frac,
                         max_guards=cfg.max_guards, reg_move_pu=cfg.reg_move_pu,
                         step_margin_pu=cfg.step_margin_pu,
                         peak_kw=float(res.head_p_kw.sum(axis=1).max()))
    seen = {}

    def at_t(e):
        v0 = np.asarray(e.circuit.AllBusVmagPu).copy()
        state = rows.cap_states(e).copy()
        cp = e.circuit.Capacitors
        cp.Name = "cap2"
        n = len(cp.States)
        # the toggled state's own voltage at 611.3, by a solve (as the rows should see it)
        cp.States = [0 if state[0] >= 0.5 else 1] * n
        e.circuit.Solution.SolveNoControl()
        seen["v_toggled"] = float(np.asarray(e.circuit.AllBusVmagPu)[k])
        cp.States = [1 if state[0] >= 0.5 else 0] * n
        e.circuit.Solution.SolveNoControl()
        # pretend the plan switched Cap2 here and the base did not: put it back
        ac.base.cap_on[t, 0] = 1.0 - state[0]
        none = {kind: np.zeros_like(m) for kind, m in _over(ac, t, k).items()}
        seen["got"] = rows.at(e, t, res, none, rows.taps(e), None, np.array([True]))
        seen["state_after"] = rows.cap_states(e).copy()
        seen["state"] = state
        seen["v_after"] = np.asarray(e.circuit.AllBusVmagPu).copy()
        seen["v0"] = v0

    saved = ac.base.cap_on.copy()
    try:
        ac.simulate_with(sched.p_kw, sched.q_kvar, {t: at_t})
    finally:
        ac.base.cap_on[...] = saved
    vr, ir = seen["got"]
    # the engine: the plan's own capacitor state and solution, as found
    assert seen["state_after"].tolist() == seen["state"].tolist()
    np.testing.assert_allclose(seen["v_after"], seen["v0"], atol=1e-5)
    # the rows: 611.3 at the toggled state's voltage, Cap2's guard a row to act on
    j = int(np.flatnonzero(vr.label == "611")[0])  # one phase there: one row
    assert vr.v_pu[j] == pytest.approx(seen["v_toggled"], abs=1e-5)
    assert abs(vr.v_pu[j] - res.v_pu[t, k]) > 0.5 * abs(part.dv[k, 0])
    c = int(np.flatnonzero(ir.label == "capcontrol.cc2")[0])
    assert ir.violated[c]
