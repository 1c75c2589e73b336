"""Data-quality flags for time series of readings, vectorised over many series at once.

Flags (bits of the stored ``quality`` integer):

====  ==============  ==========================================================
bit   flag            set on a reading when
====  ==============  ==========================================================
1     GAP             the time since the previous reading of its series exceeds
                      ``gap_factor`` x the series' typical (median) interval
2     STUCK           it is the ``stuck_n``-th or later identical value in a row
4     OUT_OF_RANGE    the value is outside the quantity's physical range
                      (:data:`derms.ingest.units.QUANTITIES`)
8     SPIKE           it differs from the median of its ``spike_window`` neighbours
                      by more than ``spike_k`` x their median absolute deviation
                      (and by more than ``spike_floor`` of the quantity's unit)
16    ESTIMATED       set by producers for estimated / substituted values
====  ==============  ==========================================================

A flag never drops a reading: flagged data are stored and can be filtered later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from derms.ingest.units import QUANTITIES
from derms.store.timeseries import Quality  # the column's bits are defined by the store


@dataclass(frozen=True, slots=True)
class QualityRules:
    """Thresholds of the quality checks (see module docstring)."""

    gap_factor: float = 2.5
    stuck_n: int = 6
    spike_window: int = 5
    spike_k: float = 8.0
    spike_floor: float = 1e-6


def out_of_range(value: np.ndarray, names, codes: np.ndarray) -> np.ndarray:
    """(n,) bool: finite values outside their quantity's physical range
    (:data:`~derms.ingest.units.QUANTITIES`; an unknown quantity has none). ``names``:
    the distinct quantity names, ``codes`` (n,): each value's index into them (one
    lookup per distinct quantity, not a pass over the rows per quantity)."""
    spec = [QUANTITIES.get(q) for q in names]
    lo = np.array([-np.inf if s is None else s.lo for s in spec])[codes]
    hi = np.array([np.inf if s is None else s.hi for s in spec])[codes]
    v = np.asarray(value, dtype=float)
    return np.isfinite(v) & ((v < lo) | (v > hi))


def quality_flags(series: np.ndarray, quantity: np.ndarray, t_us: np.ndarray,
                  value: np.ndarray, rules: QualityRules = QualityRules()) -> np.ndarray:
    """Quality bits for each reading (same order as the inputs), computed per
    (series, quantity) over the readings given, in time order."""
    n = len(value)
    flags = np.zeros(n, dtype=np.int16)
    if n == 0:
        return flags
    frame = pd.DataFrame({"s": series, "q": quantity, "t": t_us, "v": value})
    order = np.lexsort((t_us, quantity.astype(str), series.astype(str)))
    f = frame.iloc[order].reset_index(drop=True)
    key = f["s"].astype(str) + "\x00" + f["q"].astype(str)
    first = (key != key.shift()).to_numpy()
    group = np.cumsum(first) - 1

    # out of range
    v = f["v"].to_numpy(float)
    codes, names = pd.factorize(f["q"].astype(str))
    out = np.zeros(n, dtype=np.int16)
    out[out_of_range(v, names, codes)] |= Quality.OUT_OF_RANGE

    # gaps: interval above gap_factor x the group's median interval
    dt = np.diff(f["t"].to_numpy(np.int64), prepend=0).astype(float)
    dt[first] = np.nan
    med = pd.Series(dt).groupby(group).transform("median").to_numpy()
    out[(dt > rules.gap_factor * med) & np.isfinite(med)] |= Quality.GAP

    # stuck: run length of identical consecutive values within a group
    same = np.r_[False, v[1:] == v[:-1]] & ~first
    run_id = np.cumsum(~same)
    run_len = pd.Series(np.ones(n)).groupby(run_id).cumsum().to_numpy()
    out[run_len >= rules.stuck_n] |= Quality.STUCK

    # spikes: centred rolling median / MAD within a group
    w = rules.spike_window
    gv = pd.Series(v).groupby(group)
    roll_med = gv.transform(lambda s: s.rolling(w, center=True, min_periods=3).median())
    dev = (pd.Series(v) - roll_med).abs()
    mad = dev.groupby(group).transform(lambda s: s.rolling(w, center=True, min_periods=3).median())
    spike = (dev > rules.spike_k * np.maximum(mad, rules.spike_floor)) & (dev > rules.spike_floor)
    out[spike.to_numpy()] |= Quality.SPIKE

    flags[order] = out
    return flags


__all__ = ["Quality", "QualityRules", "out_of_range", "quality_flags"]
