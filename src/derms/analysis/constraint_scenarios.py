"""Scenarios for constraint forecasts, built from per-class forecast quantiles.

Inputs are quantile forecasts: DataFrames indexed by UTC interval starts with columns
``p10, p50, p90`` (any ``pNN`` levels). Two documented constructions:

``"grid"`` (default)
    Every quantile level of the load multiplier combined with every level of PV output
    (3 x 3 = 9 scenarios for p10/p50/p90). Each level stands for the probability mass
    nearest to it: with sorted levels q_1 < ... < q_k the weight of level i is
    ``(q_i + q_{i+1}) / 2 - (q_{i-1} + q_i) / 2`` with q_0 = 0 and q_{k+1} = 1, which for
    p10/p50/p90 is Swanson's 0.3 / 0.4 / 0.3 rule. Load and PV are taken as independent
    (joint weight = product); a scenario holds its level over the whole horizon (errors
    fully correlated in time, as a day's weather and temperature errors largely are) and
    all load groups move together. The grid contains the combinations that bind each
    constraint: high PV + low load (overvoltage, reverse flow) and low PV + high load
    (undervoltage, thermal), and the median of both.
``"copula"``
    ``n_samples`` Gaussian-copula sample paths: a standard-normal AR(1) score per class
    (lag-1 correlation ``ar1_per_step``), mapped through each interval's quantile function
    interpolated linearly in normal-score space between the given quantiles (linear
    extrapolation beyond the outer ones, clipped at 0). Load-PV correlation ``rho``.
    Equal weights.

Quantiles that cross (p10 > p50, as independent quantile models can produce) are sorted
per interval before use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtri

from derms.errors import InputError

_Q_COL = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")


@dataclass(frozen=True)
class ScenarioSet:
    """Weighted scenario paths over the horizon.

    ``load_mult`` (S, T, G): multiplier of each load group's base kW (import positive);
    ``pv_pu`` (S, T): PV output per unit of each system's Pmpp (generation >= 0);
    ``weight`` (S,) sums to 1; ``load_id`` (S,) indexes the distinct load paths (the base
    case without PV is run once per distinct load path); ``label`` (S,) names each one.
    """

    t: pd.DatetimeIndex
    groups: tuple[str, ...]
    load_mult: np.ndarray
    pv_pu: np.ndarray
    weight: np.ndarray
    load_id: np.ndarray
    label: tuple[str, ...]

    @property
    def n_scenarios(self) -> int:
        return len(self.weight)

    def table(self) -> pd.DataFrame:
        """One row per scenario: label, weight, load path id, mean load and PV."""
        return pd.DataFrame({
            "scenario": self.label, "weight": self.weight, "load_id": self.load_id,
            "load_mult_mean": self.load_mult.mean(axis=(1, 2)),
            "pv_pu_mean": self.pv_pu.mean(axis=1),
        })


def quantile_levels(frame: pd.DataFrame, name: str) -> np.ndarray:
    """Levels (0..1) of the ``pNN`` columns of a quantile frame, in column order."""
    levels = []
    for c in frame.columns:
        m = _Q_COL.match(str(c))
        if not m:
            raise InputError(f"{name}: column {c!r} is not a quantile column like p10/p50/p90")
        levels.append(float(m.group(1)) / 100.0)
    lv = np.asarray(levels)
    if len(lv) == 0 or not ((lv > 0) & (lv < 1)).all():
        raise InputError(f"{name}: quantile levels must lie strictly between 0 and 100")
    return lv


def _check_frame(frame: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (levels sorted, values (T, k) sorted per row) of one quantile frame."""
    if not isinstance(frame, pd.DataFrame) or len(frame) == 0:
        raise InputError(f"{name}: expected a non-empty DataFrame of quantiles")
    idx = frame.index
    if not isinstance(idx, pd.DatetimeIndex) or idx.tz is None:
        raise InputError(f"{name}: index must be timezone-aware timestamps (UTC)")
    levels = quantile_levels(frame, name)
    values = frame.to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"{name}: non-finite value in column {frame.columns[c]} at {idx[r]}")
    if (values < 0).any():
        r, c = np.argwhere(values < 0)[0]
        raise InputError(f"{name}: negative value {values[r, c]:g} in column "
                         f"{frame.columns[c]} at {idx[r]}")
    order = np.argsort(levels)
    return levels[order], np.sort(values[:, order], axis=1)


def _aligned(load_q: Mapping[str, pd.DataFrame], pv_q: pd.DataFrame
             ) -> tuple[pd.DatetimeIndex, dict[str, tuple], tuple]:
    pv = _check_frame(pv_q, "pv forecast")
    t = pd.DatetimeIndex(pv_q.index).tz_convert("UTC")
    if len(t) > 1:
        d = np.diff(t.asi8)
        if not (d == d[0]).all() or d[0] <= 0:
            raise InputError("pv forecast: index is not regular and increasing")
    loads = {}
    for g, f in load_q.items():
        loads[g] = _check_frame(f, f"load forecast {g!r}")
        if not pd.DatetimeIndex(f.index).tz_convert("UTC").equals(t):
            raise InputError(f"load forecast {g!r}: its timestamps differ from the pv "
                             f"forecast's ({len(f)} vs {len(t)} rows, first {f.index[0]} vs "
                             f"{t[0]})")
    return t, loads, pv


def level_weights(levels: np.ndarray) -> np.ndarray:
    """Probability mass represented by each sorted quantile level (midpoint rule)."""
    edges = np.concatenate([[0.0], (levels[1:] + levels[:-1]) / 2, [1.0]])
    return np.diff(edges)


def grid_scenarios(load_q: Mapping[str, pd.DataFrame], pv_q: pd.DataFrame) -> ScenarioSet:
    """Every load level x every PV level (see module docstring)."""
    t, loads, (pv_lv, pv_val) = _aligned(load_q, pv_q)
    groups = tuple(loads)
    load_lv = loads[groups[0]][0]
    for g in groups[1:]:
        if not np.allclose(loads[g][0], load_lv):
            raise InputError(f"load forecast {g!r}: quantile levels differ from "
                             f"{groups[0]!r}'s")
    w_load, w_pv = level_weights(load_lv), level_weights(pv_lv)
    li, pi = np.meshgrid(np.arange(len(load_lv)), np.arange(len(pv_lv)), indexing="ij")
    li, pi = li.ravel(), pi.ravel()
    load_paths = np.stack([loads[g][1] for g in groups], axis=-1)  # (T, k_load, G)
    return ScenarioSet(
        t=t, groups=groups,
        load_mult=np.transpose(load_paths, (1, 0, 2))[li],
        pv_pu=pv_val.T[pi], weight=w_load[li] * w_pv[pi], load_id=li,
        label=tuple(f"load p{100 * load_lv[a]:g} / pv p{100 * pv_lv[b]:g}"
                    for a, b in zip(li, pi, strict=True)),
    )


def _inverse_quantile(levels: np.ndarray, values: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Values at normal scores ``z`` (S, T) from quantiles ``values`` (T, k) at ``levels``,
    linear in normal-score space, extrapolated linearly past the outer levels, >= 0."""
    zq = ndtri(levels)  # (k,)
    if len(zq) == 1:
        return np.broadcast_to(values[:, 0], z.shape).copy()
    j = np.clip(np.searchsorted(zq, z) - 1, 0, len(zq) - 2)  # left bracket (S, T)
    rows = np.arange(values.shape[0])[None, :]
    lo, hi = values[rows, j], values[rows, j + 1]
    frac = (z - zq[j]) / (zq[j + 1] - zq[j])
    return np.clip(lo + frac * (hi - lo), 0.0, None)


def copula_scenarios(load_q: Mapping[str, pd.DataFrame], pv_q: pd.DataFrame, *,
                     n_samples: int = 100, ar1_per_step: float = 0.98, rho: float = 0.0,
                     seed: int = 0) -> ScenarioSet:
    """Gaussian-copula sample paths between the quantiles (see module docstring)."""
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1, got {n_samples}")
    if not 0 <= ar1_per_step < 1 or not -1 < rho < 1:
        raise InputError("ar1_per_step must be in [0, 1) and rho in (-1, 1)")
    t, loads, (pv_lv, pv_val) = _aligned(load_q, pv_q)
    rng = np.random.default_rng(seed)
    T = len(t)
    eps = rng.standard_normal((2, n_samples, T))
    eps[1] = rho * eps[0] + np.sqrt(1 - rho ** 2) * eps[1]
    z = np.empty_like(eps)
    z[..., 0] = eps[..., 0]
    innov = np.sqrt(1 - ar1_per_step ** 2)
    for k in range(1, T):  # a recursion over time steps, vectorised over samples
        z[..., k] = ar1_per_step * z[..., k - 1] + innov * eps[..., k]
    groups = tuple(loads)
    load_mult = np.stack([_inverse_quantile(*loads[g], z[0]) for g in groups], axis=-1)
    return ScenarioSet(
        t=t, groups=groups, load_mult=load_mult, pv_pu=_inverse_quantile(pv_lv, pv_val, z[1]),
        weight=np.full(n_samples, 1.0 / n_samples), load_id=np.arange(n_samples),
        label=tuple(f"sample {i}" for i in range(n_samples)),
    )


def build_scenarios(load_q: pd.DataFrame | Mapping[str, pd.DataFrame], pv_q: pd.DataFrame,
                    *, method: str = "grid", **kw) -> ScenarioSet:
    """Scenarios by ``method`` "grid" or "copula"; ``load_q`` one frame or {group: frame}."""
    groups = {"all": load_q} if isinstance(load_q, pd.DataFrame) else dict(load_q)
    if not groups:
        raise InputError("no load forecast given")
    if method == "grid":
        return grid_scenarios(groups, pv_q)
    if method == "copula":
        return copula_scenarios(groups, pv_q, **kw)
    raise InputError(f"scenario method {method!r}: expected 'grid' or 'copula'")
