"""The step-up guard (real OpenDSS, IEEE 13): a regulator whose band sits so high that one
tap step up from the band's lower edge lands above 1.05 pu gets a lower voltage limit at
its monitored node (the band's edge, never tighter than the base case); regulators set
lower are left alone."""

from __future__ import annotations

import numpy as np
import pytest

from derms.dispatch.verify import STEP_GUARD_PU
from derms.grid.bundled import resolve_master
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case


@pytest.fixture(scope="module")
def case():
    engine, _scenario, ac = open_dispatch_case(resolve_master("ieee13"),
                                               ScenarioConfig(n_steps=24))
    yield engine, ac
    engine.close()


def test_only_a_regulator_a_step_up_takes_over_the_limit_is_guarded(case):
    engine, ac = case
    # bundled settings: vreg 122 V on a 20:1 PT (1.017 pu) with line-drop compensation:
    # not modelled, nothing guarded
    assert ac._guard_step_up(ac.net_limits, ac.base.v_pu) is ac.net_limits
    engine.command("edit regcontrol.reg1 vreg=127 band=2 R=0 X=0")
    engine.command("edit regcontrol.reg2 vreg=122 band=2 R=0 X=0")
    try:
        node, lo, _hi, step = ac.regulator_bands(keep=1.0)
        kv = ac.index.node_kv_base_ln[node] * 1e3
        np.testing.assert_allclose(lo, np.where(lo > 1.03, 126.0, 121.0) * 20 / kv)
        np.testing.assert_allclose(step, 0.2 / 32)  # 0.9-1.1 in 32 steps
        lim = ac._guard_step_up(ac.net_limits, ac.base.v_pu)
        hot = node[lo + step > 1.05]
        assert hot.size == 1  # reg1 only: 126 V -> 1.049 pu, + 0.00625 > 1.05
        guard = lo[lo + step > 1.05][0] + STEP_GUARD_PU
        want = np.maximum(ac.net_limits.v_min[:, hot[0]],
                          np.minimum(guard, ac.base.v_pu[:, hot[0]]))
        np.testing.assert_allclose(lim.v_min[:, hot[0]], want)
        others = np.setdiff1d(np.arange(lim.v_min.shape[1]), hot)
        np.testing.assert_array_equal(lim.v_min[:, others], ac.net_limits.v_min[:, others])
    finally:
        engine.command("edit regcontrol.reg1 vreg=122 band=2 R=3 X=9")
        engine.command("edit regcontrol.reg2 vreg=122 band=2 R=3 X=9")


def test_the_hazard_regulators_taps_are_recorded_in_every_reference():
    """A regulator the guard covers gets its tap recorded per interval (``Reference.taps``,
    what ``STEP_HOLD`` compares with the base case's); one set low is not recorded."""
    from derms.dispatch.plan import uncontrolled_schedule
    from derms.dispatch.verify import ACNetwork
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine
    from derms.studies.dispatch_scenario import generate_scenario

    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        eng.command("edit regcontrol.reg1 vreg=127 band=2 R=0 X=0")
        sc = generate_scenario(read_feeder(eng.ctx, eng.source_master),
                               ScenarioConfig(n_steps=24))
        ac = ACNetwork(eng, sc.fleet, sc.customer_profiles)
        assert ac.hazard_regs == ["reg1"]
        assert ac.base.taps.shape == (24, 1)
        ref, _res = ac.reference(uncontrolled_schedule(sc.fleet))
        assert ref.taps.shape == (24, 1)
        # the recorded tap is the one the engine ends the run with at the last interval
        rc = eng.circuit.RegControls
        rc.Name = "reg1"
        assert ref.taps[-1, 0] == rc.TapNumber
