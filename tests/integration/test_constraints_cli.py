"""`derms constraints forecast` on IEEE 13: files as documented, bad input exit 2."""

from __future__ import annotations

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from derms.cli.main import app
from tests.data_formats import check_file

runner = CliRunner()


def _histories(tmp_path, days=30):
    idx = pd.date_range("2024-06-01", periods=days * 24, freq="h", tz="UTC")
    hour = idx.hour.to_numpy()
    rng = np.random.default_rng(0)
    load = 0.6 + 0.3 * np.sin((hour - 12) / 24 * 2 * np.pi) + rng.normal(0, 0.02, len(idx))
    pv = np.clip(np.sin((hour - 12) / 12 * np.pi + np.pi / 2), 0, None) * rng.uniform(
        0.5, 1.0, len(idx))
    ts = idx.strftime("%Y-%m-%dT%H:%M:%SZ")
    pd.DataFrame({"timestamp": ts, "value": load}).to_csv(tmp_path / "load.csv", index=False)
    pd.DataFrame({"timestamp": ts, "value": pv}).to_csv(tmp_path / "pv.csv", index=False)
    return tmp_path / "load.csv", tmp_path / "pv.csv"


def test_constraint_forecast_cli_writes_documented_files(tmp_path):
    load, pv = _histories(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(app, ["constraints", "forecast", "ieee13", "--load-history", str(load),
                              "--pv-history", str(pv), "--pv-penetration", "0.8",
                              "--horizon", "6h", "--pv-capacity", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    check_file(out / "hourly.csv", "derms constraints forecast")
    viol = pd.read_csv(out / "violations_forecast.csv")
    if len(viol.columns):
        check_file(out / "violations_forecast.csv", "derms constraints forecast")
    assert (out / "report.html").exists()
    res = runner.invoke(app, ["constraints", "forecast", "ieee13", "--load-history", str(load),
                              "--pv-history", str(pv), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in " ".join(res.output.split())


def test_bad_history_exits_2(tmp_path):
    (tmp_path / "bad.csv").write_text("timestamp,value\n2024-01-01T00:00:00,1\n")
    res = runner.invoke(app, ["constraints", "forecast", "ieee13", "--load-history",
                              str(tmp_path / "bad.csv"), "--pv-history", str(tmp_path / "bad.csv"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no time zone" in " ".join(res.output.split())


def _run(tmp_path, load, pv, *extra, out="o"):
    return runner.invoke(app, ["constraints", "forecast", "ieee13", "--load-history", str(load),
                               "--pv-history", str(pv), "--pv-penetration", "0.8",
                               "--horizon", "6h", "--pv-capacity", "1",
                               "--out", str(tmp_path / out), *extra])


def test_copula_method_runs_and_pv_placement_and_default_ratings_are_written(tmp_path):
    """--method copula crashed (the seed was passed twice); the PV systems the scenarios
    drive are written; thermal rows say when their rating is OpenDSS's default."""
    load, pv = _histories(tmp_path)
    res = _run(tmp_path, load, pv, "--method", "copula", "--samples", "20")
    assert res.exit_code == 0, res.output
    out = tmp_path / "o"
    placed = pd.read_csv(out / "pv_systems.csv")
    assert len(placed) and placed["pv"].str.startswith("pvsystem.").all()
    import json
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["method"] == "copula" and settings["pv_penetration"] == 0.8
    for name in ("violations_forecast.csv", "pre_existing.csv"):
        frame = pd.read_csv(out / name)
        if len(frame):
            assert "rating_is_default" in frame.columns
            assert not frame.loc[frame["kind"] != "thermal", "rating_is_default"].any()


def test_history_warnings_and_stale_origins_reach_the_user(tmp_path):
    """The forecasters' warnings (a gap here) were silenced; an origin years after the
    histories' end ran without a word."""
    load, pv = _histories(tmp_path)
    frame = pd.read_csv(load)
    frame.drop(index=range(300, 420)).to_csv(tmp_path / "gappy.csv", index=False)
    res = _run(tmp_path, tmp_path / "gappy.csv", pv)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "note: load history" in text and "missing" in text, text
    res = _run(tmp_path, load, pv, "--origin", "2030-01-01T00:00:00Z", out="o2")
    assert res.exit_code == 0, res.output
    assert "days before the origin" in " ".join(res.output.split())


def test_bad_options_exit_2_before_the_long_work(tmp_path):
    load, pv = _histories(tmp_path)
    for extra, fragment in ((("--tz", "Mars/Base"), "Mars/Base"),
                            (("--threshold", "0"), "threshold"),
                            (("--origin", "2024-01-01T00:00:00Z"), "not after the start")):
        res = _run(tmp_path, load, pv, *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert fragment in " ".join(res.output.split()), res.output
    zero = tmp_path / "zero.csv"
    pd.read_csv(pv).assign(value=0.0).to_csv(zero, index=False)
    res = runner.invoke(app, ["constraints", "forecast", "ieee13", "--load-history", str(load),
                              "--pv-history", str(zero), "--out", str(tmp_path / "o3")])
    # (the console breaks a long path anywhere: compare without the breaks)
    assert res.exit_code == 2 and "zero.csv" in "".join(res.output.split()), res.output
