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
