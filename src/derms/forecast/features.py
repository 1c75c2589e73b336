"""Forecast features for many series at once: calendar, lags known at the origin, solar geometry.

A forecast row is (series s, origin o, lead k): it predicts the value at grid index
``t = o + k`` using only values at indices ``< o``. Everything is gathered with numpy
fancy indexing from a (series × time) panel, so building features for millions of rows
is a few vectorised passes, never a Python loop over series or time steps.

Values are normalised per series by ``scale`` (a load's 99th percentile, a PV system's
capacity) so one global model serves series of any size; predictions are scaled back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from derms.errors import InputError

FEATURES_COMMON = (
    "hour", "dow", "lead_h", "is_holiday",
    "lag_d1", "lag_d2", "lag_w1", "mean_tod_7d", "last", "mean_prev_day", "max_prev_day",
)
FEATURES_PV = ("cs_emp", "cs_emp_prev", "kt_prev_day", "cs_ghi", "cs_ghi_prev")
# load: the same information as changes from the reference the model corrects (the value
# a day earlier), which trees split on directly, and the level changes known at the origin
FEATURES_LOAD = ("d_lag_d2", "d_lag_w1", "d_mean_tod_7d", "d_last_d1", "d_prev_day_d1",
                 "d_prev_day_w1")


@dataclass(frozen=True)
class Panel:
    """Series on one regular UTC grid, normalised.

    ``y``: (S, T) values / scale, NaN where missing. ``times``: (T,) UTC interval starts.
    ``cs_emp``: (S, T) empirical clear-sky envelope (normalised), PV only.
    ``cs_ghi``: (T,) clear-sky GHI / 1000 W/m² from solar geometry when a location is known.
    """

    ids: tuple[str, ...]
    y: np.ndarray
    times: pd.DatetimeIndex
    step: pd.Timedelta
    scale: np.ndarray
    kind: str
    tz: str
    cs_emp: np.ndarray | None = None
    cs_ghi: np.ndarray | None = None
    holidays: np.ndarray | None = None
    exog: tuple[tuple[str, np.ndarray], ...] = ()

    @property
    def n_day(self) -> int:
        return int(pd.Timedelta(days=1) / self.step)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (FEATURES_COMMON + (FEATURES_PV if self.kind == "pv" else FEATURES_LOAD)
                + tuple(f"w_{name}" for name, _ in self.exog))


def build_panel(values: np.ndarray, times: pd.DatetimeIndex, step: pd.Timedelta,
                scale: np.ndarray, ids: tuple[str, ...], kind: str, tz: str = "UTC",
                latitude: float | None = None, longitude: float | None = None,
                holidays: str | None = None, weather: pd.DataFrame | None = None) -> Panel:
    """Normalise ``values`` (S, T, in the series' unit) by ``scale`` (S,) into a :class:`Panel`.

    ``weather``: optional exogenous inputs indexed by UTC time (one column per variable,
    e.g. ``ghi`` in W/m², ``temp_air`` in °C), taken at each target time. In a backtest
    they must be what was *forecast* for that time; observed values make an oracle.
    """
    if kind not in ("load", "pv"):
        raise InputError(f"kind {kind!r}: expected load or pv")
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(float)
    y = (values / scale[:, None]).astype(np.float32)
    cs_emp = cs_ghi = None
    n_day = int(pd.Timedelta(days=1) / step)
    if kind == "pv":
        cs_emp = empirical_clear_sky(y, n_day)
        if latitude is not None and longitude is not None:
            cs_ghi = clear_sky_ghi(times, step, latitude, longitude)
    hol = holiday_mask(times, tz, holidays) if holidays else None
    exog = ()
    if weather is not None and not weather.empty:
        exog = tuple((str(c), _align(weather[c], times, step)) for c in weather.columns)
    return Panel(ids=tuple(ids), y=y, times=times, step=step, scale=scale, kind=kind, tz=tz,
                 cs_emp=cs_emp, cs_ghi=cs_ghi, holidays=hol, exog=exog)


def _align(col: pd.Series, times: pd.DatetimeIndex, step: pd.Timedelta) -> np.ndarray:
    """(T,) a weather column on the panel grid: interval means, gaps interpolated in time."""
    if not isinstance(col.index, pd.DatetimeIndex) or col.index.tz is None:
        raise InputError(f"weather column {col.name!r}: index must be tz-aware timestamps")
    num = pd.to_numeric(col, errors="coerce").astype(float)
    num.index = num.index.tz_convert("UTC")
    both = num.groupby(num.index.floor(step)).mean()
    full = both.reindex(both.index.union(times)).interpolate("time", limit_area="inside")
    return full.reindex(times).to_numpy(np.float32)


def empirical_clear_sky(y: np.ndarray, n_day: int, window_days: int = 14) -> np.ndarray:
    """(S, T) upper envelope of PV output: per time of day, the max of the previous ``window_days``.

    Uses only earlier days (day d sees days d-window..d-1), so it is known at any origin
    at or after day d's start. It captures the system's own orientation and shading,
    which no clear-sky irradiance model knows.
    """
    s, t = y.shape
    n_days = -(-t // n_day)
    padded = np.full((s, n_days * n_day), np.nan, dtype=np.float32)
    padded[:, :t] = y
    days = padded.reshape(s, n_days, n_day)
    env = np.full_like(days, np.nan)
    for lag in range(1, window_days + 1):        # running max over the previous days
        env[:, lag:] = np.fmax(env[:, lag:], days[:, :-lag])
    return np.nan_to_num(env, nan=0.0).reshape(s, -1)[:, :t]


def check_location(latitude: float | None, longitude: float | None,
                   names: tuple[str, str] = ("latitude", "longitude")) -> None:
    """InputError unless the location is both coordinates or neither, finite and in range
    (latitude [-90, 90], longitude [-180, 180] degrees); ``names`` name them in the
    message (the CLI's options). One alone, 95 or NaN was ignored without a word."""
    lat_name, lon_name = names
    if (latitude is None) != (longitude is None):
        given, other = (lat_name, lon_name) if latitude is not None else (lon_name, lat_name)
        raise InputError(f"{given} without {other}: give both (the site's location) or "
                         "neither")
    if latitude is None or longitude is None:
        return
    if not (np.isfinite(latitude) and -90 <= latitude <= 90):
        raise InputError(f"{lat_name} {latitude:g}: expected degrees in [-90, 90]")
    if not (np.isfinite(longitude) and -180 <= longitude <= 180):
        raise InputError(f"{lon_name} {longitude:g}: expected degrees in [-180, 180]")


def clear_sky_ghi(times: pd.DatetimeIndex, step: pd.Timedelta, latitude: float,
                  longitude: float) -> np.ndarray:
    """(T,) Ineichen clear-sky GHI at interval mid-points, in kW/m² (GHI / 1000 W/m²)."""
    import pvlib

    check_location(latitude, longitude)
    loc = pvlib.location.Location(latitude, longitude, tz="UTC")
    mid = times + step / 2
    ghi = loc.get_clearsky(mid, model="ineichen")["ghi"].to_numpy()
    return (np.nan_to_num(ghi) / 1000.0).astype(np.float32)


def holiday_mask(times: pd.DatetimeIndex, tz: str, calendar: str) -> np.ndarray:
    """(T,) 1.0 on public holidays of ``calendar`` (only "US" federal is built in)."""
    if calendar.upper() != "US":
        raise InputError(f"holidays {calendar!r}: only US is built in")
    from pandas.tseries.holiday import USFederalHolidayCalendar

    local = times.tz_convert(tz)
    days = local.normalize().tz_localize(None)
    hol = USFederalHolidayCalendar().holidays(days.min(), days.max())
    return np.isin(days.to_numpy(), hol.to_numpy()).astype(np.float32)


def _take(arr: np.ndarray, s: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    """arr[s, idx] (or arr[idx] for 1-D), NaN where idx falls outside the grid."""
    t = arr.shape[-1]
    ok = (idx >= 0) & (idx < t)
    safe = np.where(ok, idx, 0)
    out = arr[s, safe] if arr.ndim == 2 else arr[safe]
    return np.where(ok, out, np.nan).astype(np.float32)


def _last_known(y: np.ndarray, s: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Per row, the grid index of the last finite ``y[s, :o]`` (-1 when none)."""
    out = np.full(s.size, -1, dtype=np.int64)
    for sid in np.unique(s):  # one searchsorted per series (not per row or step)
        sel = s == sid
        fin = np.flatnonzero(np.isfinite(y[sid]))
        pos = np.searchsorted(fin, o[sel]) - 1
        out[sel] = np.where(pos >= 0, fin[np.maximum(pos, 0)], -1)
    return out


def _window_stats(y: np.ndarray, s: np.ndarray, o: np.ndarray, n: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max of y[s, o-n:o] per row (NaN-aware); vectorised over rows."""
    offs = np.arange(-n, 0)
    block = _take(y, s[:, None], o[:, None] + offs[None, :])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(block, axis=1), np.nanmax(block, axis=1)


def _load_changes(y: np.ndarray, cols: dict[str, np.ndarray], su: np.ndarray, ou: np.ndarray,
                  last_idx: np.ndarray, last_u: np.ndarray, inv: np.ndarray, n_day: int,
                  mean_prev: np.ndarray) -> dict[str, np.ndarray]:
    """Load features as changes (normalised units): the lags minus the value a day before the
    target; the last value minus the one a day before it; the previous day's mean minus the
    day before's and the same weekday a week earlier's. ``su, ou``: unique (series, origin)
    pairs, ``inv`` maps rows to them; ``last_idx``, ``last_u``, ``mean_prev`` their last
    known index and value and previous day's mean."""
    ref = cols["lag_d1"]
    mean_d2, _ = _window_stats(y, su, ou - n_day, n_day)
    mean_w1, _ = _window_stats(y, su, ou - 7 * n_day, n_day)
    last_d1 = np.where(last_idx >= 0, _take(y, su, last_idx - n_day), np.nan)
    return {
        "d_lag_d2": cols["lag_d2"] - ref,
        "d_lag_w1": cols["lag_w1"] - ref,
        "d_mean_tod_7d": cols["mean_tod_7d"] - ref,
        "d_last_d1": (last_u - last_d1)[inv],
        "d_prev_day_d1": (mean_prev - mean_d2)[inv],
        "d_prev_day_w1": (mean_prev - mean_w1)[inv],
    }


def feature_rows(panel: Panel, s: np.ndarray, o: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Feature matrix (N, F) for rows (series index, origin index, lead in steps).

    Only values at grid indices ``< o`` enter; the calendar and solar-geometry features
    describe the target time ``t = o + k``.
    """
    n_day = panel.n_day
    t = o + k
    y = panel.y
    d1 = k // n_day + 1                      # whole days back so that t - d1 days < o
    lag1 = t - d1 * n_day
    local = panel.times.tz_convert(panel.tz)
    hour_all = (local.hour + local.minute / 60.0).to_numpy(np.float32)
    dow_all = local.day_of_week.to_numpy(np.float32)
    doy = local.day_of_year.to_numpy(np.float32)
    tt = np.clip(t, 0, len(panel.times) - 1)
    cols = {
        "hour": hour_all[tt],
        "dow": dow_all[tt],
        "doy_sin": np.sin(2 * np.pi * doy[tt] / 365.25).astype(np.float32),
        "doy_cos": np.cos(2 * np.pi * doy[tt] / 365.25).astype(np.float32),
        "lead_h": (k * panel.step / pd.Timedelta(hours=1)).astype(np.float32),
        "is_holiday": (panel.holidays[tt] if panel.holidays is not None
                       else np.zeros(len(t), np.float32)),
        "lag_d1": _take(y, s, lag1),
        "lag_d2": _take(y, s, lag1 - n_day),
        "lag_w1": _take(y, s, t - 7 * n_day * np.maximum(1, -(-d1 // 7))),
        "last": np.zeros(len(t), np.float32),  # below: the last value known at the origin
    }
    lags7 = np.stack([_take(y, s, lag1 - j * n_day) for j in range(7)], axis=1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cols["mean_tod_7d"] = np.nanmean(lags7, axis=1)
    # the previous day's statistics depend on (series, origin) only: computed once per
    # pair, not per row (a day of 1-min values per row took GBs on 1-min series)
    _, first, inv = np.unique(s.astype(np.int64) * (y.shape[1] + 1) + o,
                                 return_index=True, return_inverse=True)
    su, ou = s[first], o[first]
    mean_u, max_u = _window_stats(y, su, ou, n_day)
    cols["mean_prev_day"], cols["max_prev_day"] = mean_u[inv], max_u[inv]
    # the last value known before the origin (o - 1 unless a gap: after one, the value
    # before it, not a missing value that the model's reference then took as 0)
    last_idx = _last_known(y, su, ou)
    last_u = _take(y, su, last_idx)
    cols["last"] = last_u[inv]
    if panel.kind == "load":
        cols.update(_load_changes(y, cols, su, ou, last_idx, last_u, inv, n_day, mean_u))
    if panel.kind == "pv":
        cs = panel.cs_emp
        day_start = o - (o % n_day)            # cs_emp of the origin's day: known at o
        cs_t = _take(cs, s, day_start + (t - day_start) % n_day)
        cols["cs_emp"] = cs_t
        cols["cs_emp_prev"] = _take(cs, s, lag1)
        prev = _take(y, su[:, None], ou[:, None] + np.arange(-n_day, 0)[None, :])
        prev_cs = _take(cs, su[:, None], ou[:, None] + np.arange(-n_day, 0)[None, :])
        with np.errstate(all="ignore"):
            kt = np.nansum(prev, axis=1) / np.nansum(prev_cs, axis=1)
        cols["kt_prev_day"] = np.where(np.isfinite(kt), np.clip(kt, 0, 2), np.nan).astype(
            np.float32)[inv]
        if panel.cs_ghi is not None:
            cols["cs_ghi"] = _take(panel.cs_ghi, None, t)
            cols["cs_ghi_prev"] = _take(panel.cs_ghi, None, lag1)
        else:
            cols["cs_ghi"] = np.full(len(t), np.nan, np.float32)
            cols["cs_ghi_prev"] = np.full(len(t), np.nan, np.float32)
    for name, arr in panel.exog:
        cols[f"w_{name}"] = _take(arr, None, t)
    return np.column_stack([cols[name] for name in panel.feature_names]).astype(np.float32)


def daylight(panel: Panel, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """True where the sun is up at target index t (clear-sky GHI > 0, else the envelope > 1 %)."""
    if panel.cs_ghi is not None:
        return _take(panel.cs_ghi, None, t) > 0.0
    if panel.cs_emp is None:
        return np.ones(len(t), bool)
    return np.nan_to_num(_take(panel.cs_emp, s, t)) > 0.01


def origin_indices(times: pd.DatetimeIndex, start: pd.Timestamp, end: pd.Timestamp, tz: str,
                   every: pd.Timedelta | None = None) -> np.ndarray:
    """Grid indices of forecast origins in [start, end): local midnights, or every ``every``."""
    if every is None:
        local_days = pd.date_range(start.tz_convert(tz).normalize(),
                                   end.tz_convert(tz).normalize(), freq="D")
        stamps = local_days.tz_convert("UTC")
    else:
        stamps = pd.date_range(start, end, freq=every)
    stamps = stamps[(stamps >= start) & (stamps < end)]
    idx = times.get_indexer(stamps)
    return np.unique(idx[idx >= 0])
