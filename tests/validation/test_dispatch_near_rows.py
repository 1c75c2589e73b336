"""A feeder held near a voltage limit everywhere (the European LV test case: its source is
at 1.05 pu, so nearly every node-phase is within 0.01 pu of the limit in every interval)
is planned with the large-feeder row rules: 152,569 near rows for 9,804 LP columns took
22 s a day; rows added where the plan reaches a limit give the same peak (44.5 against
44.6 kW, seed 1) and 0 violations in the AC simulation, in 0.4 s. Feeders with few near
rows (IEEE 123) keep every near row from the start."""

from __future__ import annotations

import pytest

from derms.dispatch import network, plan
from derms.dispatch.plan import ObjectiveConfig, Planner, uncontrolled_schedule
from derms.dispatch.verify import plan_and_verify
from derms.studies.dispatch_scenario import ScenarioConfig, open_dispatch_case
from tests.conftest import SHARED_FEEDERS


def _eu_lv():
    path = SHARED_FEEDERS / "IEEETestCases" / "LVTestCase" / "Master.dss"
    if not path.exists():
        pytest.skip(f"reference feeder not available: {path}")
    return path


def test_a_feeder_near_its_limit_everywhere_is_planned_with_lazy_rows():
    engine, sc, ac = open_dispatch_case(_eu_lv(), ScenarioConfig(seed=1))
    try:
        unc = ac.reference(uncontrolled_schedule(sc.fleet))
        before = ac.violations(unc[1]).counts
        assert before["violations_voltage"] > 100
        vp = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=unc)
        assert vp.clean, (vp.violations.counts, vp.notes)
        assert any("large-feeder rules" in n for n in vp.notes), vp.notes
        assert vp.planner.net.cluster is not None
        assert vp.planner.lp.n_rows < 10_000  # not the 154,020 of every near row
        peak_unc = unc[0].head_kw.max()
        assert vp.result.head_p_kw.sum(axis=1).max() < peak_unc - 1.0
    finally:
        engine.close()


@pytest.mark.slow
def test_lazy_rows_give_the_peak_every_near_row_gives(monkeypatch):
    """The same plan with every near row from the start (the rule switched off): the
    same peak within 0.5 %, both clean (22 s for the one with every near row)."""
    engine, sc, ac = open_dispatch_case(_eu_lv(), ScenarioConfig(seed=1))
    try:
        unc = ac.reference(uncontrolled_schedule(sc.fleet))
        lazy = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=unc)
        monkeypatch.setattr(plan, "NEAR_ROWS_PER_COL", float("inf"))
        full = plan_and_verify(ac, ObjectiveConfig(), uncontrolled=unc)
        assert full.planner.net.cluster is None and full.planner.lp.n_rows > 100_000
        assert lazy.clean and full.clean
        p_lazy = lazy.result.head_p_kw.sum(axis=1).max()
        p_full = full.result.head_p_kw.sum(axis=1).max()
        assert abs(p_lazy - p_full) <= 0.005 * p_full
    finally:
        engine.close()


def test_a_feeder_with_few_near_rows_keeps_them_all():
    from derms.grid.bundled import resolve_master

    engine, sc, ac = open_dispatch_case(resolve_master("ieee123"), ScenarioConfig(seed=1))
    try:
        ref, _res = ac.reference(uncontrolled_schedule(sc.fleet))
        pl = Planner(sc.fleet, ac.grid_context(ref), ObjectiveConfig())
        assert pl.net.cluster is None and pl.net.near_pu == 0.01
        assert pl.n_initial_rows > 1000
        assert pl.n_initial_rows <= network.NEAR_ROWS_PER_COL * pl.lay.n_cols
        assert not any("large-feeder rules" in n for n in pl.notes)
    finally:
        engine.close()
