"""Capacitor holds of the dispatch loop (real OpenDSS, IEEE 13 with a kvar-type capacitor
control added on Cap2's feeding line): the control is read, its capacitor's effect and its
monitored kvar are linearised against the AC solve, and a capacitor whose state differs
from the base case's where it drives a violation is held there (offset reference, kvar
row on the right side of its setting)."""

from __future__ import annotations

import numpy as np
import pytest

from derms.dispatch import control_rows as cr
from derms.dispatch.plan import ObjectiveConfig, Planner, uncontrolled_schedule
from derms.dispatch.verify import ACNetwork
from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.dispatch_scenario import ScenarioConfig, generate_scenario

ON, OFF = 40.0, -60.0


@pytest.fixture(scope="module")
def case():
    engine = OpenDSSEngine(resolve_master("ieee13"))
    try:
        engine.command(f"new capcontrol.cc2 capacitor=cap2 element=line.684611 terminal=1 "
                       f"type=kvar ONsetting={ON} OFFsetting={OFF}")
        sc = generate_scenario(read_feeder(engine.ctx, engine.source_master),
                               ScenarioConfig(n_steps=24, pv_penetration=1.0))
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
