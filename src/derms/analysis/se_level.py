"""The common level of the pseudo loads, fitted to the feeder head's metered P and Q.

Profiles give each load's shape, but their level is often off for the whole feeder at
once (weather, season, profiles scaled to the peak): every load is then ``k`` x its pseudo
value. The estimator's prior takes the loads' errors as independent, which cannot
represent that: on IEEE 8500 with the truth at 0.5 x base x U(0.8, 1.2) and the pseudo
loads at base, the prior calibration inflated the sigmas 4-fold and the largest error was
0.021-0.027 pu (0.005 pu at the base level). So before estimating, the pseudo loads that
carry no telemetry are scaled by ``(k_p, k_q)`` such that the AC model's head P and Q
equal the metered ones: Newton's method on the two factors with AC solves (a
finite-difference Jacobian, then Broyden updates). The factors are rounded to
``LEVEL_STEP`` (what is left, at most 1 %, the per-load prior absorbs), so successive
snapshots at one level share a prior point and the measurement Jacobian kept for it.
The estimator scales the pseudo sigmas up with a higher level but never down (a deficit
the model cannot explain, e.g. PV it does not know of, should not read as certainty; the
prior calibration narrows them where the data say so: IEEE 8500 at level 0.5, 0.0037 pu
against 0.0034 with the sigmas scaled down too).
Where the mismatch at ``k = 1`` is within ``MISMATCH_SIGMAS`` of the head's noise
nothing changes; where the best factors lie at the ends of their ranges or still leave
more than ``UNEXPLAINED_SIGMAS`` of mismatch, no load level explains the head (a wrong
head reading, far more generation than load), so nothing is applied and the estimator
says so; where Q cannot be fitted (a 10 % change of the loads' Q moves the head by less
than its noise), ``k_q = k_p`` (the loads keep their power factor), or Q as given where
``k_p`` is below Q's range.

The P level may go below 0 (to ``LEVEL_P_MIN``): the loads as a whole export, i.e.
generation the model does not know of (behind-the-meter PV). With the P range ending at
0.02 as before, unknown PV exporting at half the customers sent the fit to its floor and
Q to 1.6 against a true 0.5, so nothing was applied; EPRI ckt5 / ckt7 / IEEE 123 at 0.3 x
base with such PV (head exporting) were then 0.022-0.025 pu off (ckt5, not converged),
failed 2 of 3 (ckt7) and 0.006-0.009 pu (IEEE 123); with a negative P level they are
0.008-0.011, 0.017-0.027 and 0.002-0.005 pu, each converged (IEEE 34: 0.005-0.018
against 0.008-0.013, 8 seeds; bench/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LEVEL_STEP = 0.02
LEVEL_RANGE = (0.02, 10.0)  # of Q, and of P where the head imports
LEVEL_P_MIN = -10.0  # P: below 0 the loads as a whole export (generation not modelled)
MISMATCH_SIGMAS = 3.0
MAX_SOLVES = 8
UNEXPLAINED_SIGMAS = 10.0  # head mismatch left after the fit beyond which no level is applied
_FD_STEP = 0.05

HeadFn = Callable[[float, float], tuple[float, float]]
_LO = np.array([LEVEL_P_MIN, LEVEL_RANGE[0]])  # lower ends of (k_p, k_q)


def _pf_q(k_p: float) -> float:
    """k_q where Q cannot be fitted: the loads keep their power factor, except where the
    P level is at or below the Q range's floor (net export: PV the model does not know of
    changes P, not the loads' Q), where Q stays as given."""
    return float(k_p) if k_p >= LEVEL_RANGE[0] else 1.0


@dataclass(frozen=True)
class LoadLevel:
    """Factors on the pseudo loads' P and Q (1 = unchanged), the AC solves spent and the
    head mismatch left in units of its sigma."""

    p: float = 1.0
    q: float = 1.0
    solves: int = 0
    mismatch_sigmas: float = 0.0
    unexplained: bool = False  # no level in range matched the head: left at 1

    @property
    def changed(self) -> bool:
        return self.p != 1.0 or self.q != 1.0


def fit_load_level(head: HeadFn, z_p_kw: float, z_q_kvar: float, sd_p_kw: float,
                   sd_q_kvar: float, free_p_kw: float | None = None,
                   free_q_kvar: float | None = None) -> LoadLevel:
    """Factors ``(k_p, k_q)`` whose AC head power matches the metered ``z`` (module doc).

    ``head(k_p, k_q)`` returns the model's total head P [kW] and Q [kvar] (import
    positive) with the free pseudo loads scaled; ``sd_*`` are the metered totals' sigmas.
    ``free_*``: the free pseudo loads' totals, if given, to stop after the first solve
    where the mismatch is below half a ``LEVEL_STEP`` of them (the fit would round to 1).
    Raises whatever ``head`` raises (an AC solve that fails).
    """
    sd = np.array([max(sd_p_kw, 1e-9), max(sd_q_kvar, 1e-9)])
    z = np.array([z_p_kw, z_q_kvar])
    k = np.ones(2)
    h0 = np.asarray(head(1.0, 1.0), dtype=float)
    solves = 1
    r = z - h0
    small = np.abs(r) <= MISMATCH_SIGMAS * sd
    if free_p_kw is not None and free_q_kvar is not None:
        free = np.abs([free_p_kw, free_q_kvar])
        small |= np.abs(r) < 0.5 * LEVEL_STEP * free  # it would round to no change
    if np.all(small):
        return LoadLevel(solves=solves, mismatch_sigmas=float(np.max(np.abs(r) / sd)))
    jac = np.empty((2, 2))
    for j in range(2):
        step = np.ones(2)
        step[j] += _FD_STEP
        jac[:, j] = (np.asarray(head(*step), dtype=float) - h0) / _FD_STEP
        solves += 1
    if abs(jac[0, 0]) * 0.1 <= sd[0]:  # the loads cannot move the head's P: no level
        return LoadLevel(solves=solves, mismatch_sigmas=float(np.max(np.abs(r) / sd)))
    tied = abs(jac[1, 1]) * 0.1 <= sd[1]  # Q not identifiable: keep the power factor
    best_k, best_m = k.copy(), float(np.max(np.abs(r) / sd))
    best_r = np.abs(r) / sd
    while solves < MAX_SOLVES:
        if tied:
            dk = np.full(2, r[0] / (jac[0, 0] + jac[0, 1]))
        else:
            try:
                dk = np.linalg.solve(jac, r)
            except np.linalg.LinAlgError:
                tied = True
                continue
        k_new = np.clip(k + dk, _LO, LEVEL_RANGE[1])
        dk = k_new - k
        if not np.any(dk):
            break
        h_new = np.asarray(head(*k_new), dtype=float)
        solves += 1
        r_new = z - h_new
        m = float(np.abs(r_new[0]) / sd[0]) if tied else float(np.max(np.abs(r_new) / sd))
        if m < best_m:
            best_k, best_m, best_r = k_new.copy(), m, np.abs(r_new) / sd
        jac += np.outer((r - r_new) - jac @ dk, dk) / float(dk @ dk)  # Broyden
        k, r = k_new, r_new
        if m <= 1.0:
            break
    at_bound = (best_k <= _LO) | (best_k >= LEVEL_RANGE[1])
    if not tied and not at_bound[0] and best_r[0] <= UNEXPLAINED_SIGMAS \
            and (at_bound[1] or best_r[1] > UNEXPLAINED_SIGMAS):
        best_k = np.array([best_k[0], _pf_q(best_k[0])])  # P explained, Q not
        at_bound, best_r = at_bound & False, best_r[:1]
    elif tied:  # (k_q followed k_p, clipped to its range: only P's bound counts)
        best_k[1] = _pf_q(best_k[0])
        at_bound, best_r = at_bound[:1], best_r[:1]
    if at_bound.any() or float(np.max(best_r)) > UNEXPLAINED_SIGMAS:
        # no load level explains the head: something else does (generation the model
        # does not know of, a wrong head reading); scaling every load would hide it
        return LoadLevel(solves=solves, mismatch_sigmas=best_m, unexplained=True)
    rounded = np.clip(np.round(best_k / LEVEL_STEP) * LEVEL_STEP, _LO, LEVEL_RANGE[1])
    rounded = np.where(np.abs(rounded - 1.0) < LEVEL_STEP / 2, 1.0, rounded)
    return LoadLevel(p=round(float(rounded[0]), 6), q=round(float(rounded[1]), 6), solves=solves,
                     mismatch_sigmas=best_m)


__all__ = ["LEVEL_P_MIN", "LEVEL_RANGE", "LEVEL_STEP", "MAX_SOLVES", "MISMATCH_SIGMAS", "UNEXPLAINED_SIGMAS",
           "LoadLevel", "fit_load_level"]
