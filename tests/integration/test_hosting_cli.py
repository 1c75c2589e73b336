"""``derms hosting-capacity`` through its Typer app (registered in main.py by the lead):
real feeder, real engine, real files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from derms.cli.hosting_cmd import app
from tests.data_formats import check_file

runner = CliRunner()


def _run(*args) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())


def test_hosting_capacity_writes_table_geojson_and_map(tmp_path):
    out = tmp_path / "hc"
    code, text = _run("ieee13", "--kind", "both", "--out", out)
    assert code == 0, text
    csv = pd.read_csv(out / "hosting_capacity.csv")
    pq = pd.read_parquet(out / "hosting_capacity.parquet")
    assert len(csv) == len(pq) == 28  # 14 primary buses x 2 kinds
    for name in ("hosting_capacity.csv", "hosting_capacity.parquet", "pre_existing.csv"):
        check_file(out / name, "derms hosting-capacity")
    assert {"bus", "kind", "hc_kw", "phases", "binding", "x", "y"} <= set(csv.columns)
    assert set(csv["kind"]) == {"pv", "load"}
    assert (csv["hc_kw"] >= 0).all() and (csv["hc_kw"] <= 10_000).all()
    geo = json.loads((out / "hosting_capacity.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 28
    assert geo["features"][0]["geometry"]["type"] == "Point"
    html = (out / "report.html").read_text()
    assert "Hosting capacity map" in html and "Plotly" in html and "hosting capacity [kW]" in html
    assert "report:" in text


def test_brute_force_on_a_subset_with_phases(tmp_path):
    code, text = _run("ieee13", "--kind", "pv", "--method", "brute-force",
                      "--buses", "671,611.3,684.1", "--out", tmp_path / "b")
    assert code == 0, text
    csv = pd.read_csv(tmp_path / "b" / "hosting_capacity.csv", dtype={"phases": str})
    assert list(csv["bus"].astype(str)) == ["671", "611", "684"]
    assert list(csv["phases"]) == ["1.2.3", "3", "1"]
    assert (csv["method"] == "brute-force").all()


@pytest.mark.parametrize(("args", "message"), [
    (("--buses", "671,nosuch"), "unknown bus 'nosuch'"),
    (("--buses", "611.1"), "bus '611' has no phase 1"),
    (("--max-kw", "-5"), "--max-kw -5.0"),
    (("--max-kw", "inf", "--method", "brute-force"), "--max-kw inf"),  # looped for ever
    (("--max-kw", "1e308"), "at most 1e+06 kW"),
    (("--kind", "wind"), "--kind 'wind'"),
    (("--method", "exact"), "--method 'exact'"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, message):
    code, text = _run("ieee13", *args, "--out", tmp_path / "x")
    assert code == 2, text
    assert message in text
    assert not (tmp_path / "x").exists()


def test_missing_feeder_and_non_empty_out_exit_2(tmp_path):
    code, text = _run(tmp_path / "none.dss", "--out", tmp_path / "x")
    assert code == 2 and "not found" in text
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    code, text = _run("ieee13", "--out", tmp_path / "full")
    assert code == 2 and "--force" in text


def test_over_time_writes_the_time_table(tmp_path):
    out = tmp_path / "t"
    code, text = _run("ieee13", "--kind", "pv", "--method", "fast-groups", "--over-time",
                      "minmax", "--out", out)
    assert code == 0, text
    check_file(out / "hosting_capacity_time.csv", "derms hosting-capacity")
    check_file(out / "hosting_capacity.csv", "derms hosting-capacity")
    t = pd.read_csv(out / "hosting_capacity_time.csv")
    h = pd.read_csv(out / "hosting_capacity.csv")
    assert t["timestamp"].nunique() == 2 and len(t) == 2 * len(h)
    smallest = t.groupby("bus")["hc_kw"].min()
    assert (h.set_index("bus")["hc_kw"] - smallest.loc[h["bus"]].to_numpy()).abs().max() < 1e-6
    code, text = _run("ieee13", "--over-time", "sometimes", "--out", tmp_path / "x")
    assert code == 2 and "--over-time 'sometimes'" in text


def test_a_feeder_without_loads(tmp_path):
    """A line and no load: IndexError (exit 1) in the load linearisation's empty case.
    The site's capacity is the line's default rating (400 A at 12.47 kV, ≈ 8.6 MVA)."""
    master = tmp_path / "feeder" / "noload.dss"
    master.parent.mkdir()
    master.write_text("Clear\nNew Circuit.noload basekv=12.47 pu=1.0 phases=3 bus1=src\n"
                      "New Line.l1 bus1=src bus2=b1 phases=3 length=1 units=km\n"
                      "Set voltagebases=[12.47]\nCalcvoltagebases\n")
    code, text = _run(str(master), "--out", tmp_path / "out")
    assert code == 0, text
    hc = pd.read_csv(tmp_path / "out" / "hosting_capacity.csv")
    assert list(hc["bus"]) == ["b1"] and hc["binding"].iloc[0] == "thermal"
    assert 8000 < hc["hc_kw"].iloc[0] < 9500
