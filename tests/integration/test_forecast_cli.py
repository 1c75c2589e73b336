"""`derms forecast backtest`: files written, metrics recomputable from forecasts.csv, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from derms.cli.main import app
from derms.forecast.backtest import MODEL_NAME
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
    # said "has no time zone" for text that is no timestamp at all, or a zone name
    ("timestamp,value\nnot a time,1\n", "'not a time' is not an ISO 8601 timestamp"),
    ("timestamp,value\n2024-02-01 00:00:00 CET,1\n", "zone names such as CET"),
    ("timestamp,value\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,inf\n",
     "row 3: value 'inf' is not finite"),
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
                           (["--horizon", "soon"], "expected a duration"),
                           # a lone or out-of-range location was ignored without a word
                           (["--kind", "pv", "--latitude", "95"], "without --longitude"),
                           (["--kind", "pv", "--latitude", "95", "--longitude", "5"],
                            "--latitude 95"),
                           (["--kind", "pv", "--latitude", "nan", "--longitude", "5"],
                            "--latitude nan"),
                           (["--kind", "pv", "--latitude", "45", "--longitude", "200"],
                            "--longitude 200")):
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
    res = runner.invoke(app, [*args, "--out", str(out), "--force"])  # not a derms output
    assert res.exit_code == 2 and "manifest.json" in " ".join(res.output.split())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    (out / "keep.txt").write_text("mine")  # beside a derms output: replaced with it
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


def _frame_csv(path, idx, values):
    pd.DataFrame({"timestamp": idx.strftime("%Y-%m-%dT%H:%M:%S%z").str.replace(
        r"(\d\d)(\d\d)$", r"\1:\2", regex=True), "value": np.round(values, 4)}).to_csv(
        path, index=False)
    return path


def _bt(csv, out, *extra):
    return runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out", str(out),
                               "--rounds", "20", "--test-days", "7", *extra])


def test_constant_zero_and_net_export_series(tmp_path):
    """A test period whose peak is 0 crashed (nRMSE None formatted as a percentage); a
    net-export load (all negative) got a negative nRMSE."""
    idx = pd.date_range("2024-03-01", periods=45 * 24, freq="h", tz="UTC")
    res = _bt(_frame_csv(tmp_path / "zero.csv", idx, np.zeros(len(idx))), tmp_path / "o1")
    assert res.exit_code == 0, res.output
    assert "n/a" in res.output and "Traceback" not in res.output
    assert "nan %" not in (tmp_path / "o1" / "report.html").read_text()
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o1").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    hour = idx.hour.to_numpy()
    neg = -(50 + 20 * np.sin(hour / 24 * 2 * np.pi))
    res = _bt(_frame_csv(tmp_path / "neg.csv", idx, neg), tmp_path / "o2")
    assert res.exit_code == 0, res.output
    methods = json.loads((tmp_path / "o2" / "metrics.json").read_text())["methods"]
    assert all(m["nrmse"] > 0 for m in methods.values() if m.get("n"))


def test_a_huge_value_in_the_test_period_still_gives_a_report(tmp_path):
    """A finite 1e200 in the test period overflowed the report's number format (a
    traceback, exit 1); its infinite RMSE is written as null in metrics.json (strict
    JSON: ``Infinity`` is not), as "inf" in the report."""
    idx = pd.date_range("2024-03-01", periods=45 * 24, freq="h", tz="UTC")
    v = 50 + 20 * np.sin(idx.hour.to_numpy() / 24 * 2 * np.pi)
    v[-30] = 1e200
    res = _bt(_frame_csv(tmp_path / "huge.csv", idx, v), tmp_path / "o")
    assert res.exit_code == 0, res.output
    text = (tmp_path / "o" / "metrics.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    methods = json.loads(text)["methods"]
    assert any(m.get("nrmse") is None for m in methods.values())


def _pv(idx, scale=1.0):
    hour = (idx.hour + idx.minute / 60).to_numpy()
    sun = np.clip(np.sin((hour - 6) / 12 * np.pi), 0, None)
    day = np.arange(len(idx)) // 24
    cloud = 0.6 + 0.4 * np.random.default_rng(3).random(day.max() + 1)[day]
    return 4.0 * scale * sun * cloud


def test_pv_capacity_comes_from_before_the_test_period(tmp_path):
    """Without --capacity-kw the capacity scales the model and caps its forecasts: taken
    from the whole series it let test-period values reach them."""
    idx = pd.date_range("2024-03-01", periods=45 * 24, freq="h", tz="UTC")
    a = _pv(idx)
    b = a.copy()
    b[-3 * 24:] *= 5.0  # the last 3 days (inside the 7-day test period) scaled up
    outs = []
    for name, v in (("a", a), ("b", b)):
        res = _bt(_frame_csv(tmp_path / f"{name}.csv", idx, v), tmp_path / name, "--kind", "pv")
        assert res.exit_code == 0, res.output
        assert "before the test period" in " ".join(res.output.split())
        f = pd.read_csv(tmp_path / name / "forecasts.csv")
        outs.append(f[(f["method"] == MODEL_NAME)
                      & (pd.to_datetime(f["origin"]) < pd.Timestamp(idx[-3 * 24]))])
    assert len(outs[0]) >= 3 * 24
    np.testing.assert_allclose(outs[0]["p50"].to_numpy(), outs[1]["p50"].to_numpy())


def test_pv_capacity_checks_and_all_zero_pv(tmp_path):
    idx = pd.date_range("2024-03-01", periods=45 * 24, freq="h", tz="UTC")
    csv = _frame_csv(tmp_path / "w.csv", idx, _pv(idx) * 1000)  # watts
    res = _bt(csv, tmp_path / "o1", "--kind", "pv", "--capacity-kw", "5")
    assert res.exit_code == 0 and "same unit?" in " ".join(res.output.split()), res.output
    res = _bt(_frame_csv(tmp_path / "z.csv", idx, np.zeros(len(idx))), tmp_path / "o2",
              "--kind", "pv")
    assert res.exit_code == 2 and "all <= 0" in res.output and "--capacity-kw 0" not in \
        res.output, res.output


def test_pv_persistence_survives_blank_nights_and_weather_coverage_is_checked(tmp_path):
    idx = pd.date_range("2024-03-01", periods=45 * 24, freq="h", tz="UTC")
    v = _pv(idx)
    csv = _frame_csv(tmp_path / "pv.csv", idx[v > 0], v[v > 0])  # nights left out
    wx = tmp_path / "wx.csv"
    _frame_csv(wx, idx[: 10 * 24], np.ones(10 * 24))  # the first 10 days only
    pd.read_csv(wx).rename(columns={"value": "cloud"}).to_csv(wx, index=False)
    res = _bt(csv, tmp_path / "o", "--kind", "pv", "--capacity-kw", "4", "--weather", str(wx))
    assert res.exit_code == 0, res.output
    assert "weather file covers" in " ".join(res.output.split())
    methods = json.loads((tmp_path / "o" / "metrics.json").read_text())["methods"]
    assert methods["persistence"].get("n", 0) > 0


def test_local_offsets_with_default_utc_are_warned(tmp_path):
    csv = _write_series(tmp_path / "ny.csv", days=45, tz="America/New_York")
    res = _bt(csv, tmp_path / "o")
    assert res.exit_code == 0 and "--tz is UTC" in " ".join(res.output.split()), res.output


def test_half_hour_zone_on_an_hourly_series_says_why(tmp_path):
    csv = _write_series(tmp_path / "s.csv", days=45, tz="UTC")
    res = _bt(csv, tmp_path / "o", "--tz", "Asia/Kolkata")
    assert res.exit_code == 2 and "half-hour zone" in " ".join(res.output.split()), res.output


def test_methods_are_also_scored_on_common_rows(tmp_path):
    """After a gap a baseline has no forecast where the model has one: metrics.json also
    scores every method on the rows all of them forecast."""
    idx = pd.date_range("2024-03-01", periods=45 * 24, freq="h", tz="UTC")
    hour = idx.hour.to_numpy()
    v = 50 + 20 * np.sin(hour / 24 * 2 * np.pi) + np.random.default_rng(1).normal(0, 2, len(idx))
    keep = (idx < idx[0] + pd.Timedelta(days=38)) | (idx >= idx[0] + pd.Timedelta(days=40))
    res = _bt(_frame_csv(tmp_path / "gap.csv", idx[keep], v[keep]), tmp_path / "o")
    assert res.exit_code == 0, res.output
    methods = json.loads((tmp_path / "o" / "metrics.json").read_text())["methods"]
    scored = {k: m for k, m in methods.items() if m.get("n")}
    n_common = {m["n_common"] for m in scored.values()}
    assert len(n_common) == 1 and n_common.pop() < max(m["n"] for m in scored.values())


@pytest.mark.parametrize(("content", "message"), [
    ("timestamp,temp\n2024-03-01T00:00:00Z,\n2024-03-01T01:00:00Z,\n", "column 'temp' has no values"),
    ("timestamp,temp\n2024-03-01T00:00:00Z,1\n2024-03-01T01:00:00Z,-Infinity\n",
     "row 3: value '-Infinity' is not finite"),
])
def test_bad_weather_files_exit_2(tmp_path, content, message):
    """An all-empty or infinite weather column was taken without a word (independent test)."""
    csv = _write_series(tmp_path / "load.csv", days=30)
    wx = tmp_path / "wx.csv"
    wx.write_text(content)
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out",
                              str(tmp_path / "o"), "--weather", str(wx)])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output


def test_repeated_weather_timestamps_are_warned(tmp_path):
    csv = _write_series(tmp_path / "load.csv", days=45, tz="UTC")
    idx = pd.date_range("2024-03-01", periods=45 * 24, freq="h", tz="UTC")
    wx = _frame_csv(tmp_path / "wx.csv", idx.append(idx[5:6]), np.r_[np.ones(len(idx)), 3.0])
    pd.read_csv(wx).rename(columns={"value": "temp"}).to_csv(wx, index=False)
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out",
                              str(tmp_path / "o"), "--weather", str(wx), "--rounds", "10",
                              "--test-days", "5"])
    assert res.exit_code == 0, res.output
    assert "1 repeated timestamp(s), first 2024-03-01T05:00:00+00:00" in \
        " ".join(res.output.split()), res.output


def test_backtest_accepts_meter_timestamps_with_seconds_of_jitter(tmp_path):
    # AMI/SCADA exports stamp readings a few seconds off the interval (00:15:02,
    # 00:29:58, ...): snapped to the 15-min grid with one warning, not refused
    idx = pd.date_range("2024-01-01", periods=38 * 96, freq="15min", tz="UTC")
    rng = np.random.default_rng(4)
    hour = idx.hour.to_numpy() + idx.minute.to_numpy() / 60
    v = 50 + 20 * np.sin((hour - 7) / 24 * 2 * np.pi) + rng.normal(0, 2, len(idx))
    stamped = idx + pd.to_timedelta(rng.integers(-5, 6, len(idx)), unit="s")
    csv = tmp_path / "ami.csv"
    pd.DataFrame({"timestamp": stamped.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "value": v.round(3)}).to_csv(csv, index=False)
    out = tmp_path / "out"
    res = runner.invoke(app, ["forecast", "backtest", "--series", str(csv), "--out", str(out),
                              "--rounds", "10", "--test-days", "1"])
    assert res.exit_code == 0, res.output
    assert "moved to the nearest grid point" in " ".join(res.output.split()), res.output
    assert json.loads((out / "metrics.json").read_text())["methods"]["persistence"]["n"] > 0
    table = pd.read_csv(out / "forecasts.csv")
    assert pd.to_datetime(table["timestamp"], utc=True).dt.second.eq(0).all()


def test_backtest_accepts_weather_timestamps_with_seconds_of_jitter(tmp_path):
    # a weather export stamped a few seconds off its 15-min grid: snapped to it with the
    # series' warning, the model sees the same weather as from exact timestamps
    csv = _write_series(tmp_path / "load.csv", days=40, tz="UTC")
    grid = pd.date_range("2024-03-01", periods=41 * 96, freq="15min", tz="UTC")
    rng = np.random.default_rng(7)
    hour = grid.hour.to_numpy() + grid.minute.to_numpy() / 60
    temp = (10 + 5 * np.sin((hour - 9) / 24 * 2 * np.pi) + rng.normal(0, 1, len(grid))).round(2)
    outs = {}
    for name, stamps in (("exact", grid), ("jittered", grid + pd.to_timedelta(
            rng.integers(-5, 6, len(grid)), unit="s"))):
        wx = tmp_path / f"{name}.csv"
        pd.DataFrame({"timestamp": stamps.strftime("%Y-%m-%dT%H:%M:%SZ"), "temp_air": temp,
                      "ghi": np.clip(100 * temp - 900, 0, None)}).to_csv(wx, index=False)
        outs[name] = res = runner.invoke(app, [
            "forecast", "backtest", "--series", str(csv), "--out", str(tmp_path / name),
            "--weather", str(wx), "--rounds", "10", "--test-days", "3"])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / name / "metrics.json").read_text()
                          )["methods"][MODEL_NAME]["n"] > 0
    text = " ".join(outs["jittered"].output.split())
    assert "weather: " in text and "moved to the nearest grid point" in text, text
    assert "moved to the nearest grid point" not in outs["exact"].output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "jittered" / "forecasts.csv"),
                                  pd.read_csv(tmp_path / "exact" / "forecasts.csv"))
