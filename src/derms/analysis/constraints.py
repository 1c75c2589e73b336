"""Operating limits and violation detection over time series of voltages and loadings.

Definitions (../shared/DESIGN.md): a node-phase voltage outside [v_min, v_max] (tolerance
``v_tol_pu``) or a branch conductor above ``thermal_pct`` of its normal rating (tolerance
``thermal_tol_pct``) is a violation, per element-phase and interval. With a base case, an
element-phase already in violation in the same interval is *pre-existing*: it is held to its
base-case value instead of the limit (it may not get worse) and is reported separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from derms.errors import InputError

MAX_SIZE_KW = 1_000_000.0  # 1 GW: a larger device or study size on a distribution feeder
# is a typo (an infinite one made the brute-force hosting bisection loop for ever)

if TYPE_CHECKING:
    from derms.powerflow.snapshot import SnapshotResult

VIOLATION_COLUMNS = [
    "kind", "element", "phase", "start", "end", "duration_h", "n_steps", "worst", "limit",
    "pre_existing", "worsened",
]


@dataclass(frozen=True, slots=True)
class Limits:
    """Voltage [pu], thermal [% of normal rating] and reverse-power [kW] limits.

    ``reverse_power_kw``: when not None, a feeder-head import below ``-reverse_power_kw``
    (power flowing back to the substation) is a violation.
    """

    v_min_pu: float = 0.95
    v_max_pu: float = 1.05
    v_tol_pu: float = 0.001
    thermal_pct: float = 100.0
    thermal_tol_pct: float = 1.0
    reverse_power_kw: float | None = None
    energised_min_pu: float = 0.1  # nodes below this are taken as de-energised and skipped

    def __post_init__(self) -> None:
        if not 0 < self.v_min_pu < self.v_max_pu:
            raise InputError(f"voltage limits must satisfy 0 < v_min < v_max, got "
                             f"{self.v_min_pu}..{self.v_max_pu}")
        if self.thermal_pct <= 0:
            raise InputError(f"thermal limit must be positive, got {self.thermal_pct}")

    @property
    def v_lo_count_pu(self) -> float:
        """Voltage [pu] below which a node counts as a violation (limit - tolerance)."""
        return self.v_min_pu - self.v_tol_pu

    @property
    def v_hi_count_pu(self) -> float:
        """Voltage [pu] above which a node counts as a violation (limit + tolerance)."""
        return self.v_max_pu + self.v_tol_pu

    @property
    def thermal_count_pct(self) -> float:
        """Loading [% of the normal rating] above which a branch counts as a violation."""
        return self.thermal_pct + self.thermal_tol_pct

    @classmethod
    def ansi_range_a(cls, **kw) -> Limits:
        """ANSI C84.1 Range A service voltage: 114-126 V on 120 V (0.95-1.05 pu)."""
        return cls(v_min_pu=0.95, v_max_pu=1.05, **kw)

    @classmethod
    def ansi_range_b(cls, **kw) -> Limits:
        """ANSI C84.1 Range B service voltage: 110-127 V on 120 V (0.9167-1.0583 pu)."""
        return cls(v_min_pu=110 / 120, v_max_pu=127 / 120, **kw)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along axis 0 of a (T, N) mask: (column, first row, end row exclusive)."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1]), dtype=np.int8)
    padded[1:-1] = mask
    d = np.diff(padded, axis=0).T  # (N, T+1), column-major order groups runs per column
    col_s, start = np.nonzero(d == 1)
    col_e, end = np.nonzero(d == -1)
    assert (col_s == col_e).all()
    return col_s, start, end


def _run_reduce(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ufunc) -> np.ndarray:
    """Reduce ``flat[starts[i] : starts[i] + lengths[i]]`` for every run i, vectorised."""
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.repeat(starts - first, lengths) + np.arange(lengths.sum())
    return ufunc.reduceat(flat[pos], first)


def _events(kind: str, excess: np.ndarray, values: np.ndarray, limit: np.ndarray,
            pre: np.ndarray, worse: np.ndarray, names: np.ndarray, phases: np.ndarray,
            t: pd.DatetimeIndex, dt_h: float, worst_is_max: bool) -> pd.DataFrame:
    """Turn a (T, N) violation mask into events; a run splits where pre-existing changes.

    ``worsened`` says whether a pre-existing run got worse than the base case anywhere."""
    frames = []
    T = values.shape[0]
    red = np.maximum if worst_is_max else np.minimum
    t_end = t.append(pd.DatetimeIndex([t[-1] + pd.Timedelta(hours=dt_h)]))
    for is_pre in (False, True):
        mask = excess & (pre == is_pre)
        if not mask.any():
            continue
        col, s, e = _runs(mask)
        starts, lengths = col * T + s, e - s  # positions in column-major flattening
        frames.append(pd.DataFrame({
            "kind": kind, "element": names[col], "phase": phases[col], "start": t[s],
            "end": t_end[e], "duration_h": lengths * dt_h, "n_steps": lengths,
            "worst": _run_reduce(values.T.ravel(), starts, lengths, red),
            "limit": _run_reduce(limit.T.ravel(), starts, lengths, red),
            "pre_existing": is_pre,
            "worsened": _run_reduce(worse.T.ravel(), starts, lengths, np.maximum) if is_pre
            else False,
        }))
    return pd.concat(frames, ignore_index=True) if frames else _empty()


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in VIOLATION_COLUMNS})


@dataclass(frozen=True)
class ViolationReport:
    """Violations of one study: event table plus (element-phase x interval) counts."""

    events: pd.DataFrame
    counts: dict[str, int]
    """``violations_*``: (element-phase x interval) pairs in violation, pre-existing ones that
    got worse than the base case included; ``pre_existing_*``: pairs already in violation in
    the base case (listed separately in ``events`` with ``pre_existing`` True)."""
    per_interval: np.ndarray | None = None
    """(T,) voltage and thermal pairs counted per interval (``violations_voltage`` +
    ``violations_thermal`` interval by interval)."""


def detect_violations(
    t: pd.DatetimeIndex,
    dt_h: float,
    *,
    v_pu: np.ndarray,
    node_names: np.ndarray,
    node_phases: np.ndarray,
    loading_pct: np.ndarray,
    branch_names: np.ndarray,
    branch_phases: np.ndarray,
    head_p_kw: np.ndarray | None = None,
    limits: Limits = Limits(),
    base_v_pu: np.ndarray | None = None,
    base_loading_pct: np.ndarray | None = None,
    base_head_p_kw: np.ndarray | None = None,
) -> ViolationReport:
    """Find voltage, thermal and reverse-power violations per element-phase and interval.

    Arrays are (T, N) with the interval on axis 0; ``head_p_kw`` is the feeder-head total
    import (T,). ``base_*`` arrays (same shapes) mark pre-existing violations.
    """
    T = len(t)
    for name, arr, n in (("v_pu", v_pu, len(node_names)),
                         ("loading_pct", loading_pct, len(branch_names))):
        if arr.shape != (T, n):
            raise InputError(f"{name} has shape {arr.shape}; expected ({T}, {n})")
    live = (v_pu >= limits.energised_min_pu) & (node_phases <= 3)[None, :]
    lo, hi, th = limits.v_lo_count_pu, limits.v_hi_count_pu, limits.thermal_count_pct
    loading = np.nan_to_num(loading_pct, nan=0.0)
    frames: list[pd.DataFrame] = []
    per_t = np.zeros(T, dtype=np.int64)  # voltage and thermal pairs counted per interval

    def one(kind, values, bad, limit_value, base, base_bad, worse, worst_is_max, names, phases):
        """Record events of one kind; return (new, pre-existing) counts."""
        pre = np.zeros_like(bad)
        worsened = np.zeros_like(bad)
        limit = np.full(values.shape, limit_value, dtype=float)
        if base is not None:
            if base.shape != values.shape:
                raise InputError(f"base case for {kind} has shape {base.shape}; "
                                 f"expected {values.shape}")
            pre = bad & base_bad(base)
            limit = np.where(pre, base, limit)
            worsened = pre & worse(values, base)
        frames.append(_events(kind, bad, values, limit, pre, worsened, names, phases, t, dt_h,
                              worst_is_max))
        if kind != "reverse_power":
            per_t[:] += (bad & ~pre).sum(axis=1) + worsened.sum(axis=1)
        return int((bad & ~pre).sum() + worsened.sum()), int(pre.sum())

    tol_v, tol_th, e_min = limits.v_tol_pu, limits.thermal_tol_pct, limits.energised_min_pu
    counts = {
        "under": one("undervoltage", v_pu, live & (v_pu < lo), limits.v_min_pu, base_v_pu,
                     lambda b: (b < lo) & (b >= e_min), lambda v, b: v < b - tol_v, False,
                     node_names, node_phases),
        "over": one("overvoltage", v_pu, live & (v_pu > hi), limits.v_max_pu, base_v_pu,
                    lambda b: b > hi, lambda v, b: v > b + tol_v, True, node_names,
                    node_phases),
        "thermal": one("thermal", loading, loading > th, limits.thermal_pct,
                       None if base_loading_pct is None else np.nan_to_num(base_loading_pct),
                       lambda b: b > th, lambda v, b: v > b + tol_th, True, branch_names,
                       branch_phases),
    }
    if limits.reverse_power_kw is not None and head_p_kw is not None:
        p = np.asarray(head_p_kw, dtype=float).reshape(T, 1)
        rev = -limits.reverse_power_kw
        bp = None if base_head_p_kw is None else np.asarray(base_head_p_kw).reshape(T, 1)
        counts["reverse"] = one("reverse_power", p, p < rev, rev, bp, lambda b: b < rev,
                                lambda v, b: v < b - 1e-6, False,
                                np.array(["feeder_head"], dtype=object), np.array([0]))
    events = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(
        len(f) for f in frames) else _empty()
    summary = {
        "violations_voltage": counts["under"][0] + counts["over"][0],
        "violations_undervoltage": counts["under"][0],
        "violations_overvoltage": counts["over"][0],
        "violations_thermal": counts["thermal"][0],
        "pre_existing_voltage": counts["under"][1] + counts["over"][1],
        "pre_existing_thermal": counts["thermal"][1],
    }
    if "reverse" in counts:
        summary["violations_reverse_power"] = counts["reverse"][0]
        summary["pre_existing_reverse_power"] = counts["reverse"][1]
    return ViolationReport(events=events, counts=summary, per_interval=per_t)


def snapshot_violations(res: SnapshotResult, limits: Limits = Limits()) -> ViolationReport:
    """Voltage and thermal violations of one solved snapshot (one interval of 0 h)."""
    ix = res.index
    t = pd.DatetimeIndex([pd.Timestamp.now(tz="UTC").floor("s")])
    return detect_violations(
        t, 0.0, v_pu=res.voltages["v_pu"].to_numpy()[None, :], node_names=ix.node_bus,
        node_phases=ix.node_phase, loading_pct=res.branches["loading_pct"].to_numpy()[None, :],
        branch_names=ix.branch_element, branch_phases=ix.branch_phase, limits=limits,
    )
