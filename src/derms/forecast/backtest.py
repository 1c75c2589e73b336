"""Rolling-origin backtest of the quantile model against the baselines.

Origins are every local midnight of the test period (the last 12 months of the series;
when the series is shorter than 12 months plus the model's minimum history, everything
after that minimum, with a warning). Each forecast uses only data before its origin:
the model is refitted every ``retrain_every`` on all data before the first origin of the
block it serves (an expanding window), and every lag feature is taken before the origin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from derms.errors import InputError
from derms.forecast.api import panel_from_series
from derms.forecast.baselines import baseline_forecasts
from derms.forecast.features import daylight, origin_indices
from derms.forecast.forecaster import LOOKBACK_DAYS, MIN_TRAIN, ForecastSpec, GlobalForecaster
from derms.forecast.metrics import metrics_from_table
from derms.forecast.series import clean_series, clean_weather

MODEL_NAME = "lightgbm_quantile"
_MONTH = pd.Timedelta(days=30)
_YEAR = pd.Timedelta(days=365)


@dataclass
class BacktestResult:
    """``forecasts``: origin, timestamp, method, p10, p50, p90, actual, daylight (tidy, UTC).
    ``metrics``: {method: {mae, rmse, nrmse, crps, coverage_p10_p90, n, ...}}."""

    forecasts: pd.DataFrame
    metrics: dict[str, dict]
    test_start: pd.Timestamp
    test_end: pd.Timestamp
    warnings: list[str] = field(default_factory=list)
    fits: list[dict] = field(default_factory=list)


def backtest(series: pd.Series, spec: ForecastSpec, capacity: float | None = None,
             retrain_every: pd.Timedelta = _MONTH,
             test_length: pd.Timedelta = _YEAR,
             progress: Callable[[int, int], None] | None = None,
             weather: pd.DataFrame | None = None) -> BacktestResult:
    """Backtest ``series`` (tz-aware index; the unit of its values) for ``spec``.

    ``capacity`` (same unit as the series) normalises PV nRMSE; without it the largest
    value of the series is used and a warning says so. ``weather``: exogenous inputs
    at target times (see :func:`derms.forecast.features.build_panel`); clock jitter in
    its timestamps is repaired as in the series (:func:`derms.forecast.series.clean_weather`).
    """
    clean = clean_series(series, "series")
    warnings = list(clean.warnings)
    if capacity is not None and not capacity > 0:
        raise InputError(f"--capacity-kw {capacity}: must be positive")
    start, end = clean.values.index[0], clean.values.index[-1] + clean.step
    min_hist = MIN_TRAIN + pd.Timedelta(days=LOOKBACK_DAYS + spec.calibration_days // 2)
    if end - start < min_hist + spec.horizon:
        raise InputError(f"series: a backtest needs at least {min_hist + spec.horizon} of "
                         f"data, the series spans {end - start}")
    test_start = end - test_length
    if test_start - start < min_hist:
        test_start = start + min_hist
        warnings.append(f"the series spans {end - start}: shorter than the {test_length} test "
                        f"period plus {min_hist} of training, so the test period is "
                        f"{test_start:%Y-%m-%d} to {end:%Y-%m-%d} ({end - test_start})")
    before = clean.values[clean.values.index < test_start]
    if spec.kind == "pv" and capacity is None:
        # from the data before the test period only: the capacity scales the model and
        # clips its forecasts, and the test period must not reach them
        capacity = float(before.max()) if before.notna().any() else float("nan")
        if not capacity > 0:
            raise InputError("series: the PV values before the test period are all <= 0 "
                             "(or missing): nothing to learn from; give --capacity-kw if "
                             "the system was off")
        warnings.append(f"no capacity given: PV nRMSE is normalised by (and forecasts "
                        f"capped at) the largest value before the test period, {capacity:g}")
    elif spec.kind == "pv" and capacity is not None:
        top = float(clean.values.max())
        if top > 1.2 * capacity or top < 0.05 * capacity:
            warnings.append(f"the series peaks at {top:g}, the capacity given is {capacity:g} "
                            "(same unit? W against kW?): forecasts are capped at the "
                            "capacity")
    if weather is not None:
        weather, repaired = clean_weather(weather, "weather")
        warnings += repaired + _weather_coverage(weather, start, test_start, end)
    panel = panel_from_series({"series": clean}, spec, capacity=capacity,
                              train_end=test_start, weather=weather)
    origins = origin_indices(panel.times, test_start, end - spec.horizon + clean.step, spec.tz)
    if len(origins) == 0:
        local = pd.Timestamp(test_start).tz_convert(spec.tz).normalize()
        off = (local.tz_convert("UTC") - panel.times[0]) % clean.step
        hint = (f": local midnight in {spec.tz} falls {off} into the series' {clean.step} "
                "intervals (a half-hour zone?); resample the series or use another --tz"
                if off != pd.Timedelta(0) else "")
        raise InputError(f"series: no forecast origin in the test period{hint}")
    forecaster = GlobalForecaster(spec)
    n_h = forecaster.steps(panel)
    block_of = ((panel.times[origins] - panel.times[origins[0]]) // retrain_every).to_numpy()
    frames, fits = [], []
    blocks = np.unique(block_of)
    for i, block in enumerate(blocks):
        block_origins = origins[block_of == block]
        forecaster.fit(panel, train_end=int(block_origins[0]))
        fits.append({"first_origin": str(panel.times[block_origins[0]]), **forecaster.info})
        pred = forecaster.predict(panel, block_origins)
        pred.insert(3, "method", MODEL_NAME)
        frames.append(pred)
        if progress:
            progress(i + 1, len(blocks))
    frames.append(baseline_forecasts(panel, origins, n_h))
    table = pd.concat(frames, ignore_index=True)
    actual = clean.values
    t_idx = panel.times.get_indexer(table["timestamp"])
    table["actual"] = actual.reindex(table["timestamp"]).to_numpy()
    table["daylight"] = daylight(panel, np.zeros(len(t_idx), int), t_idx) \
        if spec.kind == "pv" else True
    cols = ["origin", "timestamp", "method"] + [c for c in table.columns
                                                if c.startswith("p") and c[1:].isdigit()]
    table = table[cols + ["actual", "daylight"]]
    metrics = metrics_from_table(table, spec.kind, capacity)
    return BacktestResult(forecasts=table, metrics=metrics, test_start=test_start,
                          test_end=end, warnings=warnings, fits=fits)


def _weather_coverage(weather: pd.DataFrame, start, test_start, end) -> list[str]:
    """Warnings when the weather inputs leave much of the training or test period empty
    (the model then learns on, or forecasts from, missing values)."""
    out = []
    have = weather.dropna(how="all").index
    for name, a, b in (("training", start, test_start), ("test", test_start, end)):
        if b <= a:
            continue
        span = (min(b, have.max()) - max(a, have.min())) if len(have) else pd.Timedelta(0)
        share = max(span / (b - a), 0.0) if len(have) else 0.0
        if share < 0.9:
            out.append(f"the weather file covers {share:.0%} of the {name} period "
                       f"({a:%Y-%m-%d} to {b:%Y-%m-%d}): forecasts there use no weather")
    return out
