"""Allocation of operating envelopes among connection points under linear network rows.

Per interval ``t`` and direction (export or import), the envelope ``x >= 0`` [kW] of every
connection point must satisfy rows ``lo_r(t) <= g_r . x <= hi_r(t)``, where ``g_r`` comes
from the linearised network (sensitivity of voltage ``u`` [pu] or signed branch current
[A] to the envelopes, the direction's sign and reactive ratio folded in) and the bounds
hold the base case, the removal of each connection point's forecast and an AC correction.
Rows are kept in a few dense blocks ``(g (R, N), lo (R, T), hi (R, T))`` and never stacked.

Policies:

* ``equal``: ``x = alpha`` for every connection point (capped at the smallest capacity);
* ``proportional``: ``x = alpha * capacity``;
* ``max_total``: the largest ``sum(x)`` with ``0 <= x <= capacity`` (an LP per interval;
  one ``highspy`` model kept across intervals, rows added where the check finds them
  violated, bounds changed in place). It may give some connection points nothing.

For ``equal``/``proportional`` alpha is closed-form: the smallest ratio of row headroom
to row coefficient. An interval whose rows cannot all hold even at ``alpha = 0`` is
reported infeasible and gets ``alpha = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import logging

import numpy as np
import scipy.sparse as sp

from derms.dispatch.lp import HighsLP, RowBlock
from derms.errors import InfeasibleError

log = logging.getLogger(__name__)

Policy = Literal["equal", "proportional", "max_total"]
POLICIES: tuple[str, ...] = ("equal", "proportional", "max_total")
_ROWS_PER_ROUND = 64
_FEAS_TOL = 1e-9


@dataclass
class RowSet:
    """One block of rows: coefficients (R, N), bounds (R, T) (+-inf where open), labels."""

    g: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    kind: np.ndarray  # (R,) str: what binds at the upper bound, e.g. "overvoltage"
    element: np.ndarray  # (R,) str
    scale: np.ndarray | float = 1.0  # (R,) unit of a row's excess (1 pu; 1 % of a rating)
    kind_lo: np.ndarray | None = None  # what binds at the lower bound (default: kind)

    def label(self, r: np.ndarray, upper: bool | np.ndarray) -> np.ndarray:
        lo = self.kind if self.kind_lo is None else self.kind_lo
        return np.where(upper, self.kind[r], lo[r])


@dataclass(frozen=True)
class Allocation:
    """Envelopes (T, N) [kW] and, per interval, the binding row and feasibility."""

    x_kw: np.ndarray
    binding_kind: np.ndarray  # (T,) str ("capacity" when no network row binds)
    binding_element: np.ndarray  # (T,) str
    infeasible: np.ndarray  # (T,) bool: some row fails even with x = 0


def allocate(rows: Sequence[RowSet], capacity_kw: np.ndarray, policy: Policy,
             steps: Sequence[int]) -> Allocation:
    """Envelopes of the chosen ``steps`` (rows of the result follow ``steps``)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (expected one of {', '.join(POLICIES)})")
    steps = np.asarray(steps, dtype=int)
    if policy == "max_total":
        return _max_total(rows, capacity_kw, steps)
    w = np.ones_like(capacity_kw) if policy == "equal" else capacity_kw
    return _scaled(rows, capacity_kw, w, steps)


def _scaled(rows: Sequence[RowSet], cap: np.ndarray, w: np.ndarray,
            steps: np.ndarray) -> Allocation:
    """x = alpha * w, alpha the largest value every row allows (closed form)."""
    n_t = steps.size
    alpha = np.full(n_t, float(np.min(cap / w)))
    kind = np.full(n_t, "capacity", dtype=object)
    elem = np.full(n_t, "", dtype=object)
    infeasible = np.zeros(n_t, dtype=bool)
    for rs in rows:
        a = rs.g @ w  # (R,)
        lo, hi = rs.lo[:, steps], rs.hi[:, steps]  # (R, T)
        infeasible |= ((lo > _FEAS_TOL) & (a[:, None] <= 0)).any(axis=0)
        infeasible |= ((hi < -_FEAS_TOL) & (a[:, None] >= 0)).any(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            up = np.where(a[:, None] > 0, hi / a[:, None], np.inf)  # a alpha <= hi
            dn = np.where(a[:, None] < 0, lo / a[:, None], np.inf)  # a alpha >= lo
        for bound, upper in ((up, True), (dn, False)):
            if bound.shape[0] == 0:
                continue
            bound = np.where(np.isnan(bound), np.inf, bound)
            r = np.argmin(bound, axis=0)
            best = bound[r, np.arange(n_t)]
            better = best < alpha
            alpha = np.where(better, best, alpha)
            kind = np.where(better, rs.label(r, upper), kind)
            elem = np.where(better, rs.element[r], elem)
    infeasible |= alpha < 0
    alpha = np.maximum(alpha, 0.0)
    return Allocation(alpha[:, None] * w[None, :], kind, elem, infeasible)


def _max_total(rows: Sequence[RowSet], cap: np.ndarray, steps: np.ndarray) -> Allocation:
    """Largest total per interval; rows generated from the most violated ones.

    The rows found for one interval stay in the model for the next ones (only their
    bounds change), so after the first few intervals most need one or two solves."""
    n = cap.size
    start = _scaled(rows, cap, np.ones(n), steps)  # feasibility at zero, first rows
    lp = HighsLP(-np.ones(n), np.zeros(n), cap.astype(float),
                 RowBlock(sp.csr_matrix((0, n)), np.zeros(0), np.zeros(0),
                          np.zeros(0, dtype=object), np.zeros(0, dtype=object),
                          np.zeros(0, dtype=int)))
    active: dict[tuple[int, int], int] = {}  # (block, row) -> LP row
    x_out = np.zeros((steps.size, n))
    kind = np.full(steps.size, "capacity", dtype=object)
    elem = np.full(steps.size, "", dtype=object)
    infeasible = start.infeasible.copy()
    for j, t in enumerate(steps):
        if infeasible[j]:
            continue
        lo, hi = _set_bounds(lp, rows, active, t)
        x = start.x_kw[j]
        solved = False
        for rnd in range(100):
            new = [k for k in _violated(rows, x, t) if k not in active]
            if new:
                lo_n, hi_n = _add(lp, rows, active, new, t)
                lo, hi = np.r_[lo, lo_n], np.r_[hi, hi_n]
            elif solved:
                break
            try:
                x = np.clip(lp.solve()[0], 0.0, cap)
            except InfeasibleError:
                infeasible[j] = True
                x = np.zeros(n)
                break
            solved = True
        x_out[j] = x
        log.debug("max_total t=%d rounds=%d rows=%d lp_solves=%d lp_s=%.2f", t, rnd + 1,
                  lp.n_rows, lp.n_solves, lp.solve_s)
        if solved and not infeasible[j]:
            kind[j], elem[j] = _binding_label(lp, lo, hi)
    return Allocation(x_out, kind, elem, infeasible)


def _violated(rows: Sequence[RowSet], x: np.ndarray, t: int) -> list[tuple[int, int]]:
    """Up to _ROWS_PER_ROUND (block, row) pairs whose bounds ``x`` breaks, worst first,
    plus the rows at zero headroom (so the LP sees what binds)."""
    found: list[tuple[float, int, int]] = []
    for b, rs in enumerate(rows):
        v = rs.g @ x
        excess = np.maximum(v - rs.hi[:, t], rs.lo[:, t] - v) / rs.scale
        bad = np.flatnonzero(excess > -1e-7)
        if bad.size > _ROWS_PER_ROUND:
            bad = bad[np.argsort(-excess[bad])[:_ROWS_PER_ROUND]]
        found += [(float(excess[r]), b, int(r)) for r in bad]
    found.sort(reverse=True)
    return [(b, r) for _, b, r in found[:_ROWS_PER_ROUND]]


def _add(lp: HighsLP, rows: Sequence[RowSet], active: dict, new: list[tuple[int, int]],
         t: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.vstack([rows[b].g[r] for b, r in new])
    lo = np.array([_finite(rows[b].lo[r, t]) for b, r in new])
    hi = np.array([_finite(rows[b].hi[r, t]) for b, r in new])
    kinds = np.array([f"{rows[b].kind[r]}|{rows[b].label(np.array([r]), False)[0]}"
                      for b, r in new], dtype=object)
    elems = np.array([rows[b].element[r] for b, r in new], dtype=object)
    idx = lp.add_rows(RowBlock(sp.csr_matrix(g), lo, hi, kinds, elems,
                               np.full(len(new), t)))
    for key, i in zip(new, idx, strict=True):
        active[key] = int(i)
    return lo, hi


def _set_bounds(lp: HighsLP, rows: Sequence[RowSet], active: dict, t: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the active rows at interval ``t`` (in LP row order)."""
    if not active:
        return np.zeros(0), np.zeros(0)
    keys = sorted(active, key=active.get)
    idx = np.array([active[k] for k in keys])
    lo = np.array([_finite(rows[b].lo[r, t]) for b, r in keys])
    hi = np.array([_finite(rows[b].hi[r, t]) for b, r in keys])
    lp.set_row_bounds(idx, lo, hi)
    return lo, hi


def _binding_label(lp: HighsLP, lo: np.ndarray, hi: np.ndarray) -> tuple[str, str]:
    """The active row with the largest dual (the one whose headroom is worth most) and
    the side it binds on."""
    sol = lp.h.getSolution()
    dual = np.abs(np.asarray(sol.row_dual))
    if dual.size == 0 or dual.max() <= 0:
        return "capacity", ""
    i = int(np.argmax(dual))
    upper, lower = str(lp.kind[i]).split("|")
    act = float(np.asarray(sol.row_value)[i])
    return (upper if abs(act - hi[i]) <= abs(act - lo[i]) else lower), str(lp.element[i])


def _finite(v: float) -> float:
    return float(np.clip(v, -1e30, 1e30))
