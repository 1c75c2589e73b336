"""Forecast benchmarks: accuracy backtests on measured data, and fleet fit/predict speed.

    python bench/bench_forecast.py accuracy   # PV (PVDAQ system 50) and feeder-load backtests
    python bench/bench_forecast.py fleet      # 1,000 series x 1 year x 15 min: fit and predict
    python bench/bench_forecast.py coverage [SEED]  # P10-P90 coverage per series, one model

Accuracy: rolling-origin day-ahead backtests (origins every local midnight, the test
period the last 12 months, or what the series allows), the LightGBM quantile model
against persistence and seasonal naive, as defined in ../shared/DESIGN.md. The figures
are ratios against the baselines measured in the same run, plus absolute MAE / nRMSE.

Fleet: 1,000 load series built from the real 8760-h shapes bundled with derms and
EPRI ckt24's feeder shapes (each series a random mix of two shapes, interpolated to
15 min, scaled, time-shifted and with 5 % multiplicative AR(1) noise; the accuracy of
this synthetic fleet is not the claim, its size is). Fit of one global model on the
whole year, then one forecast of every series x 96 steps.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from derms.forecast import ForecastSpec, backtest, forecast_many
from derms.forecast.series import clean_series

SHARED = Path(__file__).resolve().parents[2] / "shared" / "feeders"
CKT24 = SHARED / "EPRITestCircuits" / "ckt24"
SYSTEM50 = {"latitude": 39.7406, "longitude": -105.1775, "tz": "Etc/GMT+7"}


def pv_series() -> pd.Series:
    d = pd.read_parquet(files("derms") / "data/measured/pvdaq_system50_ac_power.parquet")
    return pd.Series(d["ac_power_2"].to_numpy() / 1000.0, index=pd.to_datetime(d["measured_on"]),
                     name="kW")


def pv_daily_clearness() -> pd.DataFrame:
    """Daily clearness index (GHI / clear-sky GHI per local day) from the bundled PSM3 data.

    Observed, not forecast: used as a stand-in for a day-ahead weather forecast of the
    day's cloudiness, it gives an upper bound of what such a forecast adds.
    """
    w = pd.read_parquet(files("derms") / "data/measured/pvdaq_system50_psm3_weather.parquet")
    w.index = pd.to_datetime(w["index"])
    day = w.index.tz_convert(SYSTEM50["tz"]).date
    kt = (w["ghi"].groupby(day).transform("sum")
          / w["ghi_clear"].groupby(day).transform("sum")).clip(0, 1.2)
    return pd.DataFrame({"daily_clearness": kt.astype(float)})


def hourly_shape(path: Path, tz: str = "Etc/GMT+5", year: int = 2011) -> pd.Series:
    v = np.loadtxt(path)[:8760]
    return pd.Series(v, index=pd.date_range(f"{year}-01-01", periods=len(v), freq="h", tz=tz))


def _row(name, r, capacity=None) -> list[str]:
    m = r.metrics
    model = m["lightgbm_quantile"]
    naive = min(m["seasonal_naive_day"]["mae"], m["seasonal_naive_week"]["mae"])
    pers = m["persistence"]["mae"]
    cov = model.get("coverage_p10_p90")
    extra = ""
    if "clear_sky_persistence" in m:
        extra = f"{m['clear_sky_persistence']['nrmse']:.3f}"
    return [name, f"{r.test_start:%Y-%m-%d}..{r.test_end:%Y-%m-%d}", f"{model['mae']:.4g}",
            f"{model['mae'] / naive - 1:+.1%}", f"{model['mae'] / pers - 1:+.1%}",
            f"{model['nrmse']:.3f}", f"{m['seasonal_naive_day']['nrmse']:.3f}", extra,
            f"{cov:.1%}" if cov is not None else "", f"{model['crps']:.4g}"]


def accuracy() -> None:
    head = ["series", "test period", "MAE model", "vs best seasonal naive", "vs persistence",
            "nRMSE model", "nRMSE naive-day", "nRMSE clear-sky pers.", "P10-P90 cov.", "CRPS"]
    rows = []
    runs: list[tuple] = [
        ("PV PVDAQ system 50 (3.37 kW max), location", pv_series(),
         ForecastSpec(kind="pv", **SYSTEM50), 3.368),
        ("PV PVDAQ system 50, no location", pv_series(),
         ForecastSpec(kind="pv", tz=SYSTEM50["tz"]), 3.368),
        ("PV system 50 + observed daily clearness (oracle weather)", pv_series(),
         ForecastSpec(kind="pv", **SYSTEM50), 3.368, pv_daily_clearness()),
        ("load EPRI ckt24 feeder (LS_ThreePhase)", hourly_shape(CKT24 / "LS_ThreePhase.txt"),
         ForecastSpec(kind="load", tz="Etc/GMT+5"), None),
    ]
    for i in (1, 2, 3, 4):
        runs.append((f"load OpenDSS LoadShape{i}",
                     hourly_shape(SHARED / "Examples" / "Loadshapes" / f"LoadShape{i}.CSV"),
                     ForecastSpec(kind="load", tz="Etc/GMT+5"), None))
    out = {}
    for name, series, spec, cap, *weather in runs:
        if not series.index.size or (not CKT24.exists() and "ckt24" in name):
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = backtest(series, spec, capacity=cap, weather=weather[0] if weather else None)
        dt = time.perf_counter() - t0
        rows.append(_row(name, r, cap) + [f"{dt:.0f}"])
        out[name] = {"metrics": r.metrics, "warnings": r.warnings, "seconds": dt}
        print(" | ".join(rows[-1]), flush=True)
    print()
    print("| " + " | ".join(head + ["backtest s"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    Path("bench_forecast_accuracy.json").write_text(json.dumps(out, indent=1, default=str))


def fleet(n_series: int = 1000, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    shapes = [np.loadtxt(f)[:8760] for f in
              sorted((files("derms") / "data/loadshapes").iterdir()) if str(f).upper().endswith(".CSV")]
    if CKT24.exists():
        shapes += [np.loadtxt(CKT24 / f"LS_{p}.txt")[:8759] for p in ("PhaseA", "PhaseB", "PhaseC")]
    hourly = np.vstack([np.resize(s, 8760) / np.max(s) for s in shapes])
    n_t = 8760 * 4
    x_new = np.arange(n_t) / 4.0
    quarter = np.vstack([np.interp(x_new, np.arange(8760), h, period=8760) for h in hourly])
    pick = rng.integers(0, len(quarter), size=(n_series, 2))
    w = rng.uniform(0.2, 0.8, size=(n_series, 1))
    base = w * quarter[pick[:, 0]] + (1 - w) * quarter[pick[:, 1]]
    shift = rng.integers(0, 8, size=n_series)
    rows = np.arange(n_series)[:, None]
    base = base[rows, (np.arange(n_t)[None, :] - shift[:, None]) % n_t]
    noise = np.empty_like(base)
    e = rng.normal(0, 0.05 * np.sqrt(1 - 0.9 ** 2), size=base.shape)
    noise[:, 0] = e[:, 0]
    for t in range(1, n_t):                      # AR(1) across the fleet, vectorised over series
        noise[:, t] = 0.9 * noise[:, t - 1] + e[:, t]
    values = base * (1 + noise) * rng.uniform(5, 500, size=(n_series, 1))
    times = pd.date_range("2023-01-01", periods=n_t, freq="15min", tz="UTC")
    series = {f"s{i:04d}": clean_series(pd.Series(values[i], index=times)) for i in range(n_series)}
    origin = times[-96 * 7]
    spec = ForecastSpec(kind="load", tz="Etc/GMT+5")
    from derms.forecast.api import panel_from_series
    from derms.forecast.forecaster import GlobalForecaster

    t0 = time.perf_counter()
    panel = panel_from_series(series, spec, train_end=origin, extend_to=origin + spec.horizon)
    o = int(panel.times.searchsorted(origin))
    model = GlobalForecaster(spec).fit(panel, train_end=o)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = model.predict(panel, np.array([o]))
    t_pred = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred2 = forecast_many(series, spec, origin, forecaster=model)
    t_pred_api = time.perf_counter() - t0
    actual = values[:, o:o + 96].ravel()
    p50 = pred["p50"].to_numpy()
    naive = values[:, o - 96:o].ravel()
    print(f"| series | rows total | train rows | fit s | predict {len(pred):,} rows s | "
          "predict incl. panel s | fit / 5 min | predict / 5 s | MAE model / naive-day |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {n_series} | {n_series * n_t:,} | {model.model.n_train_rows:,} | {t_fit:.1f} | "
          f"{t_pred:.2f} | {t_pred_api:.2f} | {t_fit / 300:.2f} | {t_pred_api / 5:.2f} | "
          f"{np.mean(np.abs(p50 - actual)) / np.mean(np.abs(naive - actual)):.2f} |")
    assert len(pred2) == n_series * 96


def coverage(seed: int = 0) -> None:
    """P10-P90 coverage per series of one global model, with per-series conformal offsets
    and with the global ones only (the same fitted boosters, the reference in the same
    run): 24 hourly series = the 6 bundled 8760-h shapes x multiplicative AR(1) noise of
    1 / 3 / 8 / 15 %, fitted on the first 305 days, daily origins over the last 60."""
    from derms.forecast.api import panel_from_series
    from derms.forecast.forecaster import GlobalForecaster

    rng = np.random.default_rng(seed)
    shapes = [np.loadtxt(f)[:8760] for f in
              sorted((files("derms") / "data/loadshapes").iterdir())
              if str(f).upper().endswith(".CSV")]
    times = pd.date_range("2025-01-01", periods=8760, freq="h", tz="UTC")
    series = {}
    for sig in (0.01, 0.03, 0.08, 0.15):
        eta = rng.normal(0, sig * np.sqrt(1 - 0.9**2), (len(shapes), 8760))
        e = np.zeros_like(eta)
        for t in range(1, 8760):  # AR(1), vectorised over the shapes
            e[:, t] = 0.9 * e[:, t - 1] + eta[:, t]
        for i, sh in enumerate(shapes):
            name = f"shape{i + 1}_noise{round(sig * 100)}"
            series[name] = clean_series(pd.Series(sh / sh.max() * (1 + e[i]), index=times),
                                        name=name)
    spec = ForecastSpec(kind="load", horizon=pd.Timedelta("24h"))
    panel = panel_from_series(series, spec)
    cut = len(panel.times) - 60 * 24
    t0 = time.perf_counter()
    f = GlobalForecaster(spec).fit(panel, train_end=cut)
    t_fit = time.perf_counter() - t0
    origins = np.arange(cut, len(panel.times) - 24, 24)
    actual = pd.DataFrame({"series_id": np.repeat(panel.ids, len(panel.times)),
                           "timestamp": np.tile(panel.times, len(panel.ids)),
                           "y": (panel.y * panel.scale[:, None]).ravel()})
    rows = []
    by_series = f.model.series_offsets
    for label, offsets in (("per-series offsets", by_series), ("global offsets only", {})):
        f.model.series_offsets = offsets
        m = f.predict(panel, origins).merge(actual, on=["series_id", "timestamp"])
        inside = (m.y >= m.p10) & (m.y <= m.p90)
        cov = inside.groupby(m.series_id).mean()
        crps = 2 * np.mean([np.mean(np.maximum(q * (m.y - m[c]), (q - 1) * (m.y - m[c])))
                            for q, c in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90"))])
        rows.append((label, inside.mean(), cov.min(), cov.max(), cov.std(), crps))
    f.model.series_offsets = by_series
    print(f"fit {t_fit:.1f} s, {len(series)} series x {len(origins)} origins x 24 h, seed {seed}")
    print("| offsets | coverage all | per series min | max | sd | CRPS (normalised) | "
          "CRPS / global-only |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, c_all, lo, hi, sd, crps in rows:
        print(f"| {label} | {c_all:.3f} | {lo:.3f} | {hi:.3f} | {sd:.3f} | {crps:.5f} | "
              f"{crps / rows[1][5]:.3f} |")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what == "coverage":
        coverage(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    if what in ("fleet", "all"):
        fleet()
    if what in ("accuracy", "all"):
        accuracy()
