"""Forecast accuracy as defined in DESIGN.md ("Forecast backtests").

MAE and RMSE over all intervals with an actual; load nRMSE = RMSE / peak actual of the
test period (its largest magnitude; None when that is 0), PV nRMSE = RMSE / capacity; CRPS from quantiles = 2 × the mean pinball
loss over the quantiles produced (a point forecast counts as its median, so its CRPS is
its MAE); P10–P90 coverage = share of intervals whose actual lies in [P10, P90] (for PV
only intervals with the sun up). Every figure is recomputable from the ``forecasts``
table alone (see :func:`metrics_from_table`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pinball(y: np.ndarray, pred: np.ndarray, q: float) -> np.ndarray:
    """Pinball (quantile) loss per interval, in the series' unit."""
    diff = y - pred
    return np.maximum(q * diff, (q - 1.0) * diff)


def quantile_columns(frame: pd.DataFrame) -> dict[float, str]:
    """{q: column} for the quantile columns present and not all-missing (p10 -> 0.1)."""
    out = {}
    for col in frame.columns:
        if col.startswith("p") and col[1:].isdigit() and frame[col].notna().any():
            out[int(col[1:]) / 100.0] = col
    return dict(sorted(out.items()))


def method_metrics(frame: pd.DataFrame, kind: str, capacity: float | None,
                   peak: float) -> dict:
    """Metrics of one method's rows (columns actual, p50, optional p10/p90, daylight)."""
    rows = frame[frame["actual"].notna() & frame["p50"].notna()]
    y = rows["actual"].to_numpy(float)
    if y.size == 0:
        return {"n": 0}
    err = rows["p50"].to_numpy(float) - y
    mae = float(np.mean(np.abs(err)))
    rmse = float(np.sqrt(np.mean(err ** 2)))
    norm = capacity if kind == "pv" else peak
    quants = quantile_columns(rows)
    losses = [pinball(y, rows[col].to_numpy(float), q).mean() for q, col in quants.items()]
    out = {"n": int(y.size), "mae": mae, "rmse": rmse,
           "nrmse": float(rmse / norm) if norm and np.isfinite(norm) and norm > 0 else None,
           "nrmse_normaliser": "capacity" if kind == "pv" else "peak of the test period",
           "crps": float(2.0 * np.mean(losses)),
           "coverage_p10_p90": None}
    if 0.1 in quants and 0.9 in quants:
        band = rows
        if kind == "pv" and "daylight" in rows:
            band = rows[rows["daylight"].astype(bool)]
        a = band["actual"].to_numpy(float)
        inside = (a >= band["p10"].to_numpy(float)) & (a <= band["p90"].to_numpy(float))
        out["coverage_p10_p90"] = float(inside.mean()) if inside.size else None
    return out


def metrics_from_table(forecasts: pd.DataFrame, kind: str, capacity: float | None = None
                       ) -> dict[str, dict]:
    """Metrics per method from a tidy forecasts table (see :mod:`derms.forecast.backtest`)."""
    actual = forecasts.drop_duplicates("timestamp").set_index("timestamp")["actual"]
    # the peak magnitude: a net-export series (all negative) still gets a positive one
    peak = float(actual.abs().max()) if actual.notna().any() else float("nan")
    out = {method: method_metrics(group, kind, capacity, peak)
           for method, group in forecasts.groupby("method", sort=False)}
    # the same rows for every method (after a gap a baseline has no forecast where the
    # model has one): MAE and RMSE on the (origin, timestamp) pairs all methods forecast
    ok = forecasts[forecasts["actual"].notna() & forecasts["p50"].notna()]
    n_methods = forecasts["method"].nunique()
    keys = ok.groupby(["origin", "timestamp"])["method"].transform("nunique") == n_methods
    common = ok[keys]
    for method, group in common.groupby("method", sort=False):
        err = group["p50"].to_numpy(float) - group["actual"].to_numpy(float)
        if method in out and out[method].get("n"):
            out[method].update(n_common=int(err.size), mae_common=float(np.mean(np.abs(err))),
                               rmse_common=float(np.sqrt(np.mean(err ** 2))))
    return out
