"""`derms forecast backtest`: files written, metrics recomputable from forecasts.csv, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from derms.cli.main import app
from derms.forecast.metrics import metrics_from_table

runner = CliRunner()


def _write_series(path, days=60, tz="Europe/Paris", start="2024-03-01"):
    idx = pd.date_range(start, periods=days * 24, freq="h", tz=tz)   # crosses DST on 31 March
    rng = np.random.default_rng(2)
    hour = idx.hour.to_numpy()
    v = 50 + 20 * np.sin((hour - 7) / 24 * 2 * np.pi) + rng.normal(0, 2, len(idx))
    pd.DataFrame({"timestamp": idx.strftime("%Y-%m-%dT%H:%M:%S%z").str.replace(
        r"(\d\d)(\d\d)$", r"\1:\2", regex=True), "value": v.round(4)}).to_csv(path, index=False)
    return path


def test_backtest_writes_recomputable_outputs(tmp_path):
    csv = _write_series(tmp_path / "load.csv")
    out = tmp_path / "out"
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out", str(out),
                              "--kind", "load", "--tz", "Europe/Paris", "--rounds", "20",
                              "--test-days", "10"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "metrics.json").read_text())
    methods = doc["methods"]
    assert {"lightgbm_quantile", "persistence", "seasonal_naive_day",
            "seasonal_naive_week"} <= set(methods)
    for m in methods.values():
        assert {"mae", "nrmse", "crps", "coverage_p10_p90"} <= set(m)
    assert methods["lightgbm_quantile"]["coverage_p10_p90"] is not None
    table = pd.read_csv(out / "forecasts.csv")
    assert list(table.columns[:7]) == ["origin", "timestamp", "method", "p10", "p50", "p90",
                                       "actual"]
    assert table["timestamp"].str.endswith("Z").all()
    # origins are local midnights (Europe/Paris), in UTC
    local = pd.to_datetime(table["origin"], utc=True).dt.tz_convert("Europe/Paris")
    assert (local.dt.hour == 0).all()
    again = metrics_from_table(table.assign(
        timestamp=pd.to_datetime(table["timestamp"], utc=True)), "load")
    for name, m in methods.items():
        for key in ("mae", "rmse", "nrmse", "crps"):
            assert again[name][key] == pytest.approx(m[key], rel=1e-6), (name, key)
    assert (out / "report.html").read_text().count("plotly") > 2
    assert (out / "forecasts.parquet").exists()


@pytest.mark.parametrize(("content", "message"), [
    ("timestamp,value\n2024-01-01T00:00:00,1\n", "has no time zone"),
    ("timestamp,value\n2024-01-01T00:00:00Z,abc\n", "'abc' is not a number"),
    ("time,value\n2024-01-01T00:00:00Z,1\n", "missing column(s) timestamp"),
    ("timestamp,value\nnot-a-date+01:00,1\n", "bad timestamp"),
    (("timestamp,value\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,2\n"
      "2024-01-01T02:00:00Z,3\n"), "a backtest needs at least"),
])
def test_bad_series_files_exit_2_with_a_clear_message(tmp_path, content, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output


def test_bad_options_exit_2(tmp_path):
    csv = _write_series(tmp_path / "load.csv", days=30)
    for extra, message in ((["--kind", "wind"], "expected load or pv"),
                           (["--tz", "Mars/Olympus"], "not a time zone"),
                           (["--horizon", "soon"], "expected a duration")):
        res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out",
                                  str(tmp_path / "o"), *extra])
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.output.split())
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(tmp_path / "nope.csv"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not found" in res.output


def test_metrics_json_recomputed_with_plain_pandas(tmp_path):
    """Issue 11: MAE, nRMSE, CRPS and coverage from forecasts.csv alone, to 1e-9."""
    csv = _write_series(tmp_path / "load.csv", days=45)
    out = tmp_path / "out"
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out", str(out),
                              "--rounds", "20", "--test-days", "7"])
    assert res.exit_code == 0, res.output
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    f = pd.read_csv(out / "forecasts.csv")
    peak = f.drop_duplicates("timestamp")["actual"].max()
    for name, g in f.groupby("method"):
        g = g.dropna(subset=["actual", "p50"])
        err = g["p50"] - g["actual"]
        mae, rmse = err.abs().mean(), (err ** 2).mean() ** 0.5
        qs = [(q, g[c]) for q, c in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90"))
              if g[c].notna().any()]
        pin = [(((g["actual"] - p) * q).where(g["actual"] >= p,
                                              (g["actual"] - p) * (q - 1))).mean()
               for q, p in qs]
        m = methods[name]
        assert abs(m["mae"] - mae) <= 1e-9
        assert abs(m["nrmse"] - rmse / peak) <= 1e-9
        assert abs(m["crps"] - 2 * sum(pin) / len(pin)) <= 1e-9
        if g["p10"].notna().any():
            inside = ((g["actual"] >= g["p10"]) & (g["actual"] <= g["p90"])).mean()
            assert abs(m["coverage_p10_p90"] - inside) <= 1e-9


def test_output_folder_rules(tmp_path):
    """Issue 11: a non-empty --out is refused without --force; unwritable → exit 2;
    nothing half-written (outputs appear only complete, by rename)."""
    csv = _write_series(tmp_path / "load.csv", days=45)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["forecast", "backtest", "--series", str(csv), "--rounds", "20", "--test-days", "5"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2 and "--force" in " ".join(res.output.split())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = runner.invoke(app, [*args, "--out", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["forecasts.csv", "forecasts.parquet",
                                                     "manifest.json", "metrics.json",
                                                     "report.html"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = runner.invoke(app, [*args, "--out", str(blocker / "out")])
    assert res.exit_code == 2 and "cannot write there" in " ".join(res.output.split())
    assert not list(tmp_path.glob(".out.*"))    # no temporary folder left behind


def test_outputs_match_the_data_formats_doc(tmp_path):
    from tests.data_formats import check_file

    csv = _write_series(tmp_path / "load.csv", days=45)
    out = tmp_path / "out"
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out", str(out),
                              "--rounds", "20", "--test-days", "5"])
    assert res.exit_code == 0, res.output
    for name in ("forecasts.csv", "forecasts.parquet"):
        check_file(out / name, "derms forecast backtest")
    doc = json.loads((out / "metrics.json").read_text())
    assert {"methods", "test_start", "test_end", "warnings", "fits"} <= set(doc)
