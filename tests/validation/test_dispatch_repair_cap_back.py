"""The last-mile repair puts back a kvar-controlled capacitor the plan switched (real
OpenDSS, IEEE 13 with a kvar-type control added on Cap2's feeding line, as in
``test_dispatch_cap_hold``): which (interval, capacitor) pairs are put back, the rows
are computed at the put-back state (checked against a solve with the capacitor toggled)
and the engine is left as found."""

from __future__ import annotations

import numpy as np
import pytest

from derms.dispatch import ac_repair_rows as rr
from derms.dispatch.ac_repair import RepairConfig
from derms.dispatch.control_rows import HOLD_MIN_PU, cap_sensitivity
from derms.dispatch.plan import uncontrolled_schedule
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
        part = cap_sensitivity(ac.lin, ac.der_map(), ac.capctl)
        yield engine, ac, part
    finally:
        engine.close()


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
    _engine, ac, part = case
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
    _engine, ac, part = case
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
