"""derms against OpenDSS's own text-driven solve on the shared reference feeders.

The reference is an independent engine context that compiles a private copy of the feeder
with plain text commands and solves it; derms goes through its engine wrapper, importer,
index and result tables. Node voltages must agree to 1e-6 pu, element counts and total
load exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.snapshot import solve_snapshot
from tests.conftest import SHARED_FEEDERS, SHARED_MASTERS, shared_master
from tests.validation.conftest import reference_v_pu

FEEDERS = list(SHARED_MASTERS)


def _reference(master: Path, tmp: Path):
    """Compile and solve a copy of the feeder with text commands only."""
    from dss import DSS

    root = SHARED_FEEDERS
    shutil.copytree(root / master.relative_to(root).parts[0], tmp / "ref",
                    ignore=shutil.ignore_patterns("ieee9500dss", "LVTestCase", "ckt7"))
    copy = tmp / "ref" / Path(*master.relative_to(root).parts[1:])
    ctx = DSS.NewContext()
    ctx.AllowChangeDir = False
    for cmd in (f'compile "{copy}"', "set maxiterations=100", "set maxcontroliter=100",
                "set controlmode=static", "set mode=snapshot", "solve"):
        ctx.Text.Command = cmd
    assert ctx.ActiveCircuit.Solution.Converged
    return ctx


def _class_counts(ctx) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in ctx.ActiveCircuit.AllElementNames:
        cls = name.split(".", 1)[0].lower()
        counts[cls] = counts.get(cls, 0) + 1
    return counts


def _total_load_kw(ctx) -> float:
    c = ctx.ActiveCircuit
    total = 0.0
    for name in c.AllElementNames:
        if name.lower().startswith("load."):
            c.Loads.Name = name.split(".", 1)[1]
            total += c.Loads.kW
    return total


@pytest.mark.parametrize("feeder", FEEDERS)
def test_voltages_counts_and_load_match_opendss(feeder, tmp_path):
    master = shared_master(feeder)
    ref = _reference(master, tmp_path)
    rc = ref.ActiveCircuit

    with OpenDSSEngine(master) as engine:
        model = read_feeder(engine.ctx, engine.source_master)
        snap = solve_snapshot(engine)

    v = snap.voltages
    keys = list(v["bus"] + "." + v["phase"].astype(str))
    assert set(keys) == {n.lower() for n in rc.AllNodeNames}, "node sets differ"
    # ungrounded areas (IEEE 37, IEEE 123's bus 610) are measured line to line: against
    # the reference's own puVLL there
    ll = set(np.array(keys)[(v["v_measure"] == "ll").to_numpy()])
    diff = np.abs(v["v_pu"].to_numpy() - reference_v_pu(rc, keys, ll))
    assert diff.max() <= 1e-6, f"{feeder}: max |dV| = {diff.max():.3g} pu"

    counts = _class_counts(ref)
    mc = model.counts()
    assert mc["buses"] == rc.NumBuses
    assert mc["nodes"] == rc.NumNodes
    for cls, key in [("line", "lines"), ("transformer", "transformers"), ("load", "loads"),
                     ("capacitor", "capacitors"), ("regcontrol", "regulators"),
                     ("pvsystem", "pv_systems"), ("storage", "storage"),
                     ("generator", "generators")]:
        assert mc[key] == counts.get(cls, 0), f"{feeder}: {cls} count"
    assert model.total_load_kw == pytest.approx(_total_load_kw(ref), rel=1e-12)
    # the solved feeder-head power agrees with the reference too
    rc.Vsources.First
    p_ref = -sum(rc.ActiveCktElement.Powers[0:6:2])
    assert snap.totals["head_p_kw"] == pytest.approx(p_ref, rel=1e-9)
