"""Snapshot tables against quantities OpenDSS computes itself (loading %, ratings)."""

from __future__ import annotations

import numpy as np
import pytest

from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.snapshot import solve_snapshot


@pytest.mark.parametrize("feeder", ["ieee13", "ieee123", "ieee8500"])
def test_loading_matches_engine_pct_normal(feeder):
    with OpenDSSEngine(resolve_master(feeder)) as eng:
        snap = solve_snapshot(eng)
        model = read_feeder(eng.ctx, eng.source_master)
        pd_el = eng.circuit.PDElements
        ref = dict(zip((n.lower() for n in pd_el.AllNames), pd_el.AllPctNorm(), strict=True))
    b = snap.branches
    ours = b.groupby("element")["loading_pct"].max()
    # OpenDSS's figure is the max over the element's terminal-1 conductors (neutral too),
    # so it can only be above ours where a neutral carries more than the phases
    diffs = np.array([ref[e] - v for e, v in ours.items() if np.isfinite(v)])
    assert np.quantile(np.abs(diffs), 0.95) < 1e-3
    assert diffs.min() > -1e-3
    # nameplate ratings of transformers come from each transformer's own kVA and kV
    xf = {t.name: t for t in model.transformers}
    tr = snap.transformers.drop_duplicates("element")
    for row in tr.itertuples():
        t = xf[row.element]
        kv_ph = t.kv[0] if t.phases == 1 else t.kv[0] / np.sqrt(3)
        assert row.kva == t.kva
        assert row.rated_a == pytest.approx(t.kva / (t.phases * kv_ph))


def test_ieee13_transformer_figures():
    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        snap = solve_snapshot(eng)
    x = snap.transformers.set_index(["element", "phase"])
    assert x.loc[("transformer.xfm1", 1), "rated_a"] == pytest.approx(500 / (np.sqrt(3) * 4.16))
    # the substation transformer (5 MVA) carries the 3.5 MW feeder at roughly 75 %
    assert 60 < x.loc[("transformer.sub", 1), "loading_pct"] < 90
