"""The typed model of IEEE 13 against the published feeder data (IEEE PES test feeder)."""

from __future__ import annotations

import pytest

from derms.errors import InputError, ModelError
from derms.grid.bundled import resolve_master
from derms.grid.opendss_import import read_feeder
from derms.powerflow.engine import OpenDSSEngine


@pytest.fixture(scope="module")
def ieee13():
    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        yield read_feeder(eng.ctx, eng.source_master)


def test_counts_and_head(ieee13):
    assert ieee13.counts() == {
        "buses": 16, "nodes": 41, "lines": 12, "transformers": 5, "regulators": 3,
        "capacitors": 2, "switches": 1, "loads": 15, "pv_systems": 0, "storage": 0,
        "generators": 0,
    }
    assert ieee13.head.bus == "sourcebus" and ieee13.head.base_kv_ll == 115.0
    assert ieee13.total_load_kw == pytest.approx(3466.0)


def test_elements(ieee13):
    sw = ieee13.switches[0]
    assert (sw.element, sw.bus1, sw.bus2, sw.closed) == ("line.671692", "671", "692", True)
    reg = {r.name: r for r in ieee13.regulators}["regcontrol.reg1"]
    assert reg.transformer == "transformer.reg1" and reg.vreg_v == 122 and reg.pt_ratio == 20
    cap = {c.name: c for c in ieee13.capacitors}["capacitor.cap1"]
    assert cap.bus == "675" and cap.kvar == 600 and cap.phases == 3
    xfm = {t.name: t for t in ieee13.transformers}["transformer.xfm1"]
    assert xfm.kva == 500 and xfm.kv == (4.16, 0.48) and xfm.buses == ("633", "634")
    line = {ln.name: ln for ln in ieee13.lines}["line.650632"]
    assert line.length_km == pytest.approx(2000 * 0.3048e-3)
    assert line.rating_is_default
    load = {ld.name: ld for ld in ieee13.loads}["load.611"]
    assert load.nodes == (3, 0) and load.p_kw == 170 and load.model == 5


def test_distances_follow_the_feeder(ieee13):
    # 650 -> 632 (2000 ft) -> 670 (667 ft) -> 671 (1333 ft) -> 680 (1000 ft)
    assert ieee13.bus("680").distance_km == pytest.approx(5000 * 0.3048e-3)
    assert ieee13.bus("650").distance_km == 0.0
    assert ieee13.bus("675").x is not None
    with pytest.raises(KeyError, match="nosuch"):
        ieee13.bus("nosuch")


def test_bad_master_paths(tmp_path):
    with pytest.raises(InputError, match="not found"):
        OpenDSSEngine(tmp_path / "missing.dss")
    with pytest.raises(InputError, match="not a file"):
        OpenDSSEngine(tmp_path)
    empty = tmp_path / "empty.dss"
    empty.write_text("! nothing here\n")
    with pytest.raises(ModelError, match="no circuit"):
        OpenDSSEngine(empty)


def test_compile_never_writes_into_the_source_folder(tmp_path):
    import shutil

    src = tmp_path / "feeder"
    shutil.copytree(resolve_master("ieee13").parent, src)
    shutil.copy(resolve_master("ieee13").parent.parent / "IEEELineCodes.DSS", tmp_path)
    master = src / "IEEE13Nodeckt.dss"
    (src / "trace.dss").write_text("")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with OpenDSSEngine(master) as eng:
        eng.command("edit regcontrol.reg1 debugtrace=yes")
        eng.solve_snapshot()
        eng.command("set mode=daily number=3")
        eng.solve()
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before


def test_compile_restores_the_working_directory(tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    with OpenDSSEngine(resolve_master("ieee13")) as eng:
        assert os.getcwd() == str(tmp_path)
        eng.solve_snapshot()
    assert os.getcwd() == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written where the user stands
