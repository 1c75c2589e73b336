"""Hosting capacity over time = the snapshot method at each interval's loads; checked
against an engine whose loads were set by plain OpenDSS edits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from derms.analysis.hosting_capacity import hosting_capacity_fast, resolve_sites
from derms.analysis.hosting_series import hosting_capacity_over_time, pick_steps
from derms.errors import InputError
from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.control_state import freeze_base_case
from derms.powerflow.engine import OpenDSSEngine
from derms.studies.qsts_study import StudyConfig, study_profiles

CFG = StudyConfig(days=1, step=timedelta(hours=1), start=datetime(2026, 7, 1, tzinfo=UTC))


@pytest.mark.parametrize("kind", ["pv", "load"])
def test_each_snapshot_matches_an_independently_loaded_engine(kind):
    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        eng.solve_snapshot()
        model = read_feeder(eng.ctx, eng.source_master)
        prof, _ = study_profiles(model, CFG)
        steps = pick_steps(eng, prof, "minmax")
        sites = resolve_sites(eng)
        per_step, horizon = hosting_capacity_over_time(eng, prof, sites, kind, steps=steps,
                                                       verify=True)
    assert len(steps) == 2 and len(per_step) == 2 * len(sites)
    for k in steps:
        with OpenDSSEngine(resolve_master("ieee13")) as ref:
            for j, el in enumerate(prof.elements):
                ld = next(x for x in model.loads if x.name == el)
                m = prof.p_mult[k, j]
                ref.command(f"edit {el} kW={ld.p_kw * m} kvar={ld.q_kvar * m}")
            freeze_base_case(ref)
            want = hosting_capacity_fast(ref, resolve_sites(ref), kind).table
        got = per_step[per_step["timestamp"] == prof.times[k]]
        np.testing.assert_allclose(got["hc_kw"].to_numpy(), want["hc_kw"].to_numpy(),
                                   rtol=1e-6, atol=1e-3)
    smallest = per_step.groupby(["bus", "phases"], sort=False)["hc_kw"].min()
    np.testing.assert_allclose(horizon.table.set_index(["bus", "phases"])["hc_kw"],
                               smallest.loc[horizon.table.set_index(["bus", "phases"]).index])


def test_light_load_lowers_pv_hosting_capacity_somewhere():
    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        eng.solve_snapshot()
        model = read_feeder(eng.ctx, eng.source_master)
        prof, _ = study_profiles(model, CFG)
        lo, hi = pick_steps(eng, prof, "minmax")
        total = prof.p_mult @ np.array([next(x for x in model.loads if x.name == e).p_kw
                                        for e in prof.elements])
        assert total[lo] < total[hi]
        per_step, _ = hosting_capacity_over_time(eng, prof, resolve_sites(eng), "pv",
                                                 steps=[lo, hi])
    t = per_step.pivot_table(index="bus", columns="timestamp", values="hc_kw")
    assert (t[prof.times[lo]] < t[prof.times[hi]] - 1.0).any()


def test_bad_steps():
    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        eng.solve_snapshot()
        model = read_feeder(eng.ctx, eng.source_master)
        prof, _ = study_profiles(model, CFG)
        with pytest.raises(InputError, match="steps must be"):
            hosting_capacity_over_time(eng, prof, resolve_sites(eng), "pv", steps=[99])
        with pytest.raises(InputError, match="minmax or all"):
            pick_steps(eng, prof, "some")
    assert pd is not None
