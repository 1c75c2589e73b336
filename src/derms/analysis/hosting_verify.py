"""OpenDSS check of the model's hosting-capacity sizes.

:func:`verify_site` finds one site's AC size near a starting estimate by a bracketed
secant search on the margins of every constraint (:class:`~derms.analysis.hosting_ac.
ACProbe`); :func:`verify_groups` checks the model's sizes on OpenDSS one representative
per group of sites sharing the binding constraint and phase set, until the engine has
agreed ``trust_after`` times, re-verifying and rescaling where it disagrees.

Sign convention: a size ``P >= 0`` is the device's output; the site's net import is
``sign * P`` (PV ``-1``, load ``+1``).
"""

from __future__ import annotations

import numpy as np

from derms.analysis.hosting_ac import (
    ACProbe,
    HostingCriteria,
    Site,
    _feasible,
    _secant_root,
)

TRUST_AFTER = 3  # model/engine agreements before the model is trusted


def verify_site(probe: ACProbe, site: Site, sign: float, p_lin_kw: float,
                criteria: HostingCriteria, m0: np.ndarray, max_solves: int = 8
                ) -> tuple[float, int, np.ndarray | None]:
    """AC-verify a linear estimate near the limit.

    Keeps a bracket (largest AC-feasible size ``lo``, smallest violated or non-converged
    size ``hi``); each step takes the secant root of the margins through the last two AC
    points (the base case first), aimed slightly to the safe side, or bisects when the
    secant leaves the bracket. Stops when a feasible point's own secant root lies within
    ``rel_tol`` (+ ``tol_kw``) of it, or the bracket is that narrow.

    Returns (``lo`` [kW], AC solves used, margins at ``lo``).
    """
    p_max, tol, rel = criteria.p_max_kw, criteria.tol_kw, criteria.rel_tol
    lo, m_lo, hi = 0.0, m0, np.inf
    prev_p, prev_m = 0.0, m0
    p = min(max(p_lin_kw, tol), p_max)
    used = 0
    while used < max_solves:
        m = probe.margins(site, p, sign)
        used += 1
        ok = _feasible(m)
        if ok:
            lo, m_lo = p, m
        else:
            hi = p
        est = _secant_root(prev_p, prev_m, p, m) if m is not None and p != prev_p else np.nan
        if ok and (p >= p_max or est <= p * (1 + rel) + tol):
            break
        if hi - lo <= max(tol, rel * lo):
            break
        if m is not None:
            prev_p, prev_m = p, m
        if np.isfinite(est):
            est = est * (1 + rel / 2) if ok else est * (1 - rel / 2)
        step = 0.9 * max(tol, rel * lo)  # closest approach to the bracket's ends
        if np.isfinite(est) and lo < est < min(hi, 2 * p_max):
            p = min(max(est, lo + step), hi - step, p_max)
        elif np.isfinite(hi):
            p = (lo + hi) / 2
        else:
            p = min(2 * p, p_max)
    return lo, used, m_lo


def verify_groups(probe: ACProbe, sites: list[Site], sign: float, hc: np.ndarray,
                   criteria: HostingCriteria, b_kind, b_elem, m0: np.ndarray,
                   model_bind: tuple[np.ndarray, np.ndarray],
                   trust_after: int = TRUST_AFTER) -> np.ndarray:
    """AC-verify (OpenDSS) one representative per group of sites that share the model's
    binding constraint and phase set, largest groups first; where OpenDSS disagrees with
    the model, verify the representative by :func:`verify_site` and scale the group's
    sizes by its AC/model ratio (``hc`` updated in place).

    The model sizes solve the AC equations of the same network (controls frozen), so the
    check is of the model against the engine, one AC solve at the representative's model
    size: they agree when that size is AC-feasible and the binding constraint's AC margin
    there matches the model's to ``rel_tol`` of the margin used up from the base case,
    both up to the engine's own resolution (:meth:`ACProbe.resolution`: its convergence
    tolerance, 1e-4 pu by default; the model stops within 0.5 % of the root, where the
    margin left can be smaller than that).
    Once ``trust_after`` groups agree and none has disagreed, the remaining groups keep
    their model sizes (no AC solve; ``n_ac_solves`` 0); after any disagreement every group
    is checked. ``model_bind``: per site, the model's binding row (probe order, -1 when
    none) and its margin at the model size. Returns the AC solves per site.
    """
    b_row, m_bind = model_bind
    n_ac = np.zeros(len(sites), dtype=int)
    floor = probe.resolution()
    keys = [f"{k}|{el}|{s.phases}" for k, el, s in zip(b_kind, b_elem, sites, strict=True)]
    _, key_id = np.unique(keys, return_inverse=True)
    by_key = np.argsort(key_id, kind="stable")
    groups = sorted(np.split(by_key, np.flatnonzero(np.diff(key_id[by_key])) + 1),
                    key=len, reverse=True)
    agreed, disagreed = 0, False
    for members in groups:
        if agreed >= trust_after and not disagreed:
            break
        idx = np.asarray(members)
        order = idx[np.argsort(hc[idx])]
        rep = int(order[len(order) // 2])           # the median model size
        if hc[rep] <= 0 or hc[rep] >= criteria.p_max_kw or b_row[rep] < 0:
            continue
        m = probe.margins(sites[rep], float(hc[rep]), sign)
        n_ac[rep] = 1
        b = b_row[rep]
        if m is not None and (m >= -floor).all() and abs(m[b] - m_bind[rep]) <= max(
                criteria.rel_tol * abs(m0[b] - m_bind[rep]), floor[b]):
            agreed += 1
            continue
        disagreed = True  # the engine disagrees: verify, correct the group
        start = hc[rep] * (1 - criteria.rel_tol / 2)
        ac, used, _ = verify_site(probe, sites[rep], sign, start, criteria, m0)
        n_ac[rep] += used
        hc[idx] = np.minimum(hc[idx] * (ac / hc[rep]), criteria.p_max_kw)
        hc[rep] = ac
    return n_ac
