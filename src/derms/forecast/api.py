"""Entry points: series in, quantile forecasts out.

``forecast_quantiles`` forecasts one series from one origin (fit + predict, the model
never sees data at or after the origin). ``forecast_many`` fits one global model on many
series and forecasts all of them from one origin, in batch.
"""

from __future__ import annotations

import warnings as _warnings

import numpy as np
import pandas as pd

from derms.errors import InputError
from derms.forecast.features import Panel, build_panel
from derms.forecast.forecaster import LOOKBACK_DAYS, MIN_TRAIN, ForecastSpec, GlobalForecaster
from derms.forecast.series import CleanSeries, clean_series, clean_weather

_DAY = pd.Timedelta(hours=24)


class ForecastWarning(UserWarning):
    """Something in the input was repaired or limits the forecast (message says what)."""


def panel_from_series(series: dict[str, CleanSeries], spec: ForecastSpec,
                      capacity: float | dict[str, float] | None = None,
                      train_end: pd.Timestamp | None = None,
                      extend_to: pd.Timestamp | None = None,
                      weather: pd.DataFrame | None = None) -> Panel:
    """Align cleaned series on one grid (their union, up to ``extend_to``) into a Panel.

    Scale per series: PV → ``capacity`` (or the largest value before ``train_end``);
    load → the 99th percentile of the values before ``train_end``.
    """
    steps = {c.step for c in series.values()}
    if len(steps) != 1:
        raise InputError(f"series have different steps {sorted(map(str, steps))}; resample "
                         "them to one step first")
    step = steps.pop()
    start = min(c.values.index[0] for c in series.values())
    end = max(c.values.index[-1] for c in series.values())
    if extend_to is not None and extend_to - step > end:
        end = extend_to - step
    grid = pd.date_range(start, end, freq=step)
    ids = tuple(series)
    values = np.vstack([series[i].values.reindex(grid).to_numpy(float) for i in ids])
    cut = len(grid) if train_end is None else int(grid.searchsorted(train_end))
    hist = values[:, :max(cut, 1)]
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", RuntimeWarning)
        if spec.kind == "pv":
            if isinstance(capacity, dict):
                scale = np.array([capacity.get(i, np.nan) for i in ids], float)
            elif capacity is not None:
                scale = np.full(len(ids), float(capacity))
            else:
                scale = np.full(len(ids), np.nan)
            scale = np.where(np.isfinite(scale), scale, np.nanmax(hist, axis=1))
        else:
            scale = np.nanpercentile(np.abs(hist), 99, axis=1)
    return build_panel(values, grid, step, scale, ids, spec.kind, tz=spec.tz,
                       latitude=spec.latitude, longitude=spec.longitude, holidays=spec.holidays,
                       weather=weather)


def _check_origin(origin: pd.Timestamp) -> pd.Timestamp:
    origin = pd.Timestamp(origin)
    if origin.tzinfo is None:
        raise InputError(f"origin {origin}: needs a time zone")
    return origin.tz_convert("UTC")


def forecast_quantiles(history: pd.Series, *, kind: str, origin: pd.Timestamp,
                       horizon: pd.Timedelta = _DAY,
                       quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
                       latitude: float | None = None, longitude: float | None = None,
                       capacity: float | None = None, tz: str = "UTC",
                       weather: pd.DataFrame | None = None, **spec_options) -> pd.DataFrame:
    """Quantile forecast of ``history`` for [origin, origin + horizon).

    ``history`` is indexed by tz-aware interval starts, values in any unit (the forecast
    has the same unit). Only values before ``origin`` are used. Returns a DataFrame
    indexed by UTC timestamps at the history's step with one column per quantile
    (``p10``, ``p50``, ``p90``). Warnings about the input are issued as
    :class:`ForecastWarning`. Histories shorter than the model needs (about 22 days)
    raise :class:`InputError`. ``weather`` (optional, indexed by UTC time, through the
    horizon) adds exogenous inputs such as a GHI or temperature forecast; timestamps with
    clock jitter are snapped to its grid by the series' rule (warned likewise).
    """
    origin = _check_origin(origin)
    hist = history[history.index < origin] if isinstance(history.index, pd.DatetimeIndex) \
        and history.index.tz is not None else history
    clean = clean_series(hist, "history")
    repaired: list[str] = []
    if weather is not None:
        weather, repaired = clean_weather(weather, "weather")
    for msg in clean.warnings + repaired:
        _warnings.warn(msg, ForecastWarning, stacklevel=2)
    spec = ForecastSpec(kind=kind, horizon=pd.Timedelta(horizon), quantiles=tuple(quantiles),
                        tz=tz, latitude=latitude, longitude=longitude, **spec_options)
    return forecast_many({"history": clean}, spec, origin, capacity=capacity, weather=weather
                         ).drop(columns=["series_id", "origin"]).set_index("timestamp")


def forecast_many(series: dict[str, CleanSeries], spec: ForecastSpec, origin: pd.Timestamp,
                  capacity: float | dict[str, float] | None = None,
                  forecaster: GlobalForecaster | None = None,
                  weather: pd.DataFrame | None = None) -> pd.DataFrame:
    """Fit (unless ``forecaster`` is already fitted) and forecast every series from ``origin``.

    Returns the long table of :meth:`GlobalForecaster.predict`. Clock jitter in the
    ``weather`` timestamps is repaired as in the series, with a :class:`ForecastWarning`.
    """
    origin = _check_origin(origin)
    if weather is not None:
        weather, repaired = clean_weather(weather, "weather")
        for msg in repaired:
            _warnings.warn(msg, ForecastWarning, stacklevel=2)
    panel = panel_from_series(series, spec, capacity=capacity, train_end=origin,
                              extend_to=origin + spec.horizon, weather=weather)
    if spec.horizon < panel.step or spec.horizon % panel.step != pd.Timedelta(0):
        raise InputError(f"horizon {spec.horizon} is not a whole number of the series' "
                         f"{panel.step} steps")
    o = int(panel.times.searchsorted(origin))
    if o >= len(panel.times) or panel.times[o] != origin:
        raise InputError(f"origin {origin} is not on the series' {panel.step} grid")
    needed = MIN_TRAIN + pd.Timedelta(days=LOOKBACK_DAYS)
    if o * panel.step < needed:
        raise InputError(f"the history before {origin} spans {o * panel.step}; the model "
                         f"needs at least {needed}")
    if forecaster is None or forecaster.model is None:
        forecaster = GlobalForecaster(spec).fit(panel, train_end=o)
    return forecaster.predict(panel, np.array([o]))
