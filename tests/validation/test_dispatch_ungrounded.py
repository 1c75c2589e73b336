"""Dispatch on an ungrounded (3-wire delta) feeder, IEEE 37, and what the AC-verification
loop hands back when it cannot clean a plan.

Before the line-to-line measure and delta injections (derms.powerflow.voltage_measure),
every seed failed here: node-to-ground sensitivities of ~12 pu per 200 kW, margins that
grew each AC round until the LP had no solution, and nothing written.
"""

from __future__ import annotations

import numpy as np
import pytest

from derms.der.models import Connection
from derms.dispatch.plan import ObjectiveConfig, uncontrolled_schedule
from derms.dispatch.verify import plan_and_verify
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case
from tests.conftest import shared_master


def _case(seed: int):
    engine, scenario, ac = open_dispatch_case(shared_master("ieee37"), ScenarioConfig(seed=seed))
    unc = uncontrolled_schedule(scenario.fleet)
    return engine, scenario, ac, ac.reference(unc)


@pytest.mark.parametrize("seed", [0, 1])
def test_ieee37_plan_is_clean_and_shaves_the_peak(seed):
    engine, scenario, ac, (ref, res) = _case(seed)
    try:
        assert any(d.connection.conn == "delta" for d in scenario.fleet.ders)
        vp = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=(ref, res))
        assert vp.clean, (vp.violations.counts, vp.notes)
        assert not vp.notes
        peak_unc = res.head_p_kw.sum(axis=1).max()
        assert vp.result.head_p_kw.sum(axis=1).max() < peak_unc - 50.0
    finally:
        engine.close()


def test_loop_never_returns_a_plan_worse_than_uncontrolled(monkeypatch):
    """With the old physics forced back (node-to-ground measure, DER power split over
    phase nodes), the tightened LP runs out of room after a few AC rounds: the loop
    returns, says why, and hands back a schedule no worse than leaving the DERs alone."""
    monkeypatch.setattr(OpenDSSEngine, "voltage_pairs",
                        lambda self: np.full(int(self.circuit.NumNodes), -1, dtype=np.int64))
    monkeypatch.setattr(Connection, "injection_terminals",
                        property(lambda self: self.injection_nodes))
    engine, _scenario, ac, (ref, res) = _case(1)
    try:
        vp = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=(ref, res))
        unc = ac.violations(res).counts
        n = vp.violations.counts["violations_voltage"] + vp.violations.counts[
            "violations_thermal"]
        assert n <= unc["violations_voltage"] + unc["violations_thermal"]
        assert vp.notes and any("no solution" in s or "uncontrolled" in s for s in vp.notes)
        text = " ".join(vp.notes)
        # the re-plan that ran out of room says why in pu (not LP units), or its network
        # rows were made elastic (the LP then always has a plan) and the notes say so
        assert "pu against a limit of" in text or "made elastic" in text
    finally:
        engine.close()
