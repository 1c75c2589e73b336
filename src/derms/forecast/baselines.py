"""Reference forecasts every model is compared with (point forecasts, as the P50).

- ``persistence``: the last value known before the origin, held flat.
- ``seasonal_naive_day``: the value one day earlier (two days for the second day of a
  48-h horizon, so it is always known at the origin).
- ``seasonal_naive_week``: the value seven days earlier.
- ``clear_sky_persistence`` (PV): yesterday's value at the same time scaled by the ratio
  of today's clear-sky envelope to yesterday's (a "smart persistence").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from derms.forecast.features import Panel, _take

BASELINES_LOAD = ("persistence", "seasonal_naive_day", "seasonal_naive_week")
BASELINES_PV = BASELINES_LOAD + ("clear_sky_persistence",)


def baseline_names(kind: str) -> tuple[str, ...]:
    return BASELINES_PV if kind == "pv" else BASELINES_LOAD


def baseline_forecasts(panel: Panel, origins: np.ndarray, n_h: int,
                       series: np.ndarray | None = None) -> pd.DataFrame:
    """Long table (series_id, origin, timestamp, method, p50) of every baseline."""
    ser = np.arange(panel.y.shape[0]) if series is None else np.asarray(series)
    s, oi, k = (a.ravel() for a in np.meshgrid(ser, np.arange(len(origins)), np.arange(n_h),
                                                indexing="ij"))
    o = np.asarray(origins)[oi]
    t = o + k
    keep = t < panel.y.shape[1]
    s, o, k, t = s[keep], o[keep], k[keep], t[keep]
    n_day = panel.n_day
    d1 = k // n_day + 1
    lag1 = t - d1 * n_day
    y = panel.y
    # the last value known before the origin (a gap, or PV nights left blank, would
    # otherwise leave persistence without a forecast)
    idx = np.where(np.isfinite(y), np.arange(y.shape[1])[None, :], -1)
    last_known = np.maximum.accumulate(idx, axis=1)
    prev = np.where(o >= 1, last_known[s, np.maximum(o - 1, 0)], -1)
    preds = {
        "persistence": _take(y, s, prev),
        "seasonal_naive_day": _take(y, s, lag1),
        "seasonal_naive_week": _take(y, s, t - 7 * n_day * np.maximum(1, -(-d1 // 7))),
    }
    if panel.kind == "pv":
        cs = panel.cs_emp
        day_start = o - (o % n_day)
        cs_now = np.nan_to_num(_take(cs, s, day_start + (t - day_start) % n_day))
        cs_then = np.nan_to_num(_take(cs, s, lag1))
        ratio = np.where(cs_then > 0.02, cs_now / np.maximum(cs_then, 0.02), 1.0)
        preds["clear_sky_persistence"] = np.clip(preds["seasonal_naive_day"] * ratio, 0,
                                                 np.maximum(cs_now, 0) * 1.05 + 1e-6)
    scale = panel.scale[s]
    frames = []
    base = {"series_id": np.asarray(panel.ids, dtype=object)[s], "origin": panel.times[o],
            "timestamp": panel.times[t]}
    for name, p in preds.items():
        frames.append(pd.DataFrame({**base, "method": name, "p50": p * scale}))
    return pd.concat(frames, ignore_index=True)
