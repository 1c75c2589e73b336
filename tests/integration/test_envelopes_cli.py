"""``derms envelopes`` through the main CLI: real feeder, real engine, real files checked
against docs/data-formats.md; bad input exits 2 with a clear message."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from derms.cli.main import app
from tests.data_formats import check_file

runner = CliRunner()
FILES = ("envelopes.csv", "envelopes.parquet", "intervals.csv", "connection_points.csv",
         "pre_existing.csv")


def _run(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["envelopes", *[str(a) for a in args]])
    return res.exit_code, " ".join(res.output.split())


def test_envelopes_write_documented_files(tmp_path):
    out = tmp_path / "doe"
    code, text = _run("ieee123", "--out", out, "--step", "1h", "--connection-points", "30",
                      "--policy", "proportional")
    assert code == 0, text
    for name in FILES:
        check_file(out / name, "derms envelopes")
    text_cols = {"connection_point": str, "bus": str, "phase": str}
    env = pd.read_csv(out / "envelopes.csv", dtype=text_cols)
    assert len(env) == 30 * 24 and env["connection_point"].nunique() == 30
    assert (env[["export_limit_kw", "import_limit_kw"]] >= 0).all().all()
    assert env["timestamp"].str.endswith("Z").all()
    pq = pd.read_parquet(out / "envelopes.parquet").astype(text_cols)
    pd.testing.assert_frame_equal(env.drop(columns=["export_limit_kw", "import_limit_kw"]),
                                  pq.drop(columns=["export_limit_kw", "import_limit_kw"]))
    np.testing.assert_allclose(env["export_limit_kw"], pq["export_limit_kw"], rtol=1e-5)
    summ = json.loads((out / "summary.json").read_text())
    assert summ["connection_points"] == 30 and summ["intervals"] == 24
    ratio = env["export_limit_kw"].sum() / (5.0 * len(env))
    assert np.isclose(summ["export"]["ratio_vs_static"], ratio, rtol=1e-4)
    assert summ["export"]["ac_max_v_excess_pu"] <= 0.0005
    iv = pd.read_csv(out / "intervals.csv")
    assert set(iv["direction"]) == {"export", "import"} and len(iv) == 48
    geo = json.loads((out / "envelopes.geojson").read_text())
    assert len(geo["features"]) == 30
    html = (out / "report.html").read_text()
    assert "Operating envelopes" in html and "Plotly" in html
    assert "report:" in text and "x a static 5 kW" in text


def test_profiles_file_sets_the_horizon(tmp_path):
    prof = tmp_path / "forecast.csv"
    times = pd.date_range("2026-01-15", periods=6, freq="15min", tz="UTC")
    pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "load.s1a": np.linspace(0.5, 1.0, 6)}).to_csv(prof, index=False)
    code, text = _run("ieee123", "--out", tmp_path / "o", "--profiles", prof,
                      "--connection-points", "s1a,s2b", "--direction", "export")
    assert code == 0, text
    env = pd.read_csv(tmp_path / "o" / "envelopes.csv")
    assert len(env) == 12 and env["timestamp"].iloc[0] == "2026-01-15T00:00:00Z"
    assert env["import_limit_kw"].isna().all()  # direction not computed


@pytest.mark.parametrize(("args", "message"), [
    (("--connection-points", "s1a,nosuch"), "no enabled load of that name"),
    (("--connection-points", "100000"), "the feeder has"),
    (("--capacity-kw", "-5"), "--capacity-kw -5.0"),
    (("--policy", "fair"), "--policy 'fair'"),
    (("--direction", "sideways"), "--direction 'sideways'"),
    (("--voltage-range", "C"), "--voltage-range 'C'"),
    (("--step", "2h"), "step"),
    (("--step", "7min"), "not a whole number of 7-min steps"),  # was rounded to 18 x 7 min
    (("--start", "yesterday"), "--start 'yesterday'"),
    (("--start", "9999-12-31T23:00Z"), "expected a year from 1900"),  # was year 10000
    (("--capacity-kw", "inf"), "--capacity-kw inf: must be positive and finite"),
])
def test_bad_input_exits_2(tmp_path, args, message):
    code, text = _run("ieee123", "--out", tmp_path / "x", "--hours", "2", *args)
    assert code == 2, text
    assert message in text


def test_refuses_a_non_empty_folder_without_force(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, text = _run("ieee123", "--out", out, "--hours", "1")
    assert code == 2 and "--force" in text
    assert (out / "keep.txt").exists()
