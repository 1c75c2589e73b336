"""Hosting capacity of many sites on one factorised model: linear sizes, then AC sizes.

Both come from :class:`derms.powerflow.linear_newton.SiteFlows` (the network Jacobian of
the frozen base case, factorised once; one column per site):

* **linear** (:func:`linear_sizes`): the unit response of every site gives, per
  constraint, the closed-form size at which it binds (headroom / sensitivity, as
  (constraints x sites) arrays; ``u``-form voltages; branch currents taken as collinear
  with their base current, so a current that reverses is bounded on both sides);
* **model AC** (:func:`model_sizes`): a bracketed secant search on the margins of every
  constraint, all sites at once, each trial size solved by the batched chord-Newton AC
  power flow of ``SiteFlows`` (the same physics as the OpenDSS check: constant-power
  injection, every load by its own law, controls frozen), to ``rel_tol`` of the root.

Margins follow :class:`derms.analysis.hosting_capacity.ACProbe` (limit minus value, >= 0
feasible; pu, A, kW). Sign convention: a size ``P >= 0`` is the device's output; the site's
net import is ``sign * P`` (PV ``sign = -1``, load ``+1``).
"""

from __future__ import annotations

import numpy as np

from derms.powerflow.linear_newton import SiteFlows, sub_columns

_SITES_PER_BATCH = 256  # columns per batch (memory ~ 16 B x Y nodes x sites, per array)
MODEL_REL_TOL = 0.005   # the model search stops within 0.5 % (+ tol_kw) of the root


class ModelMargins:
    """Constraint margins of site scenarios on the model, in :class:`ACProbe` order, on
    the rows ``keep`` (indices into the probe's margin vector; None = all)."""

    def __init__(self, sf: SiteFlows, probe, sign: float, keep: np.ndarray | None = None
                 ) -> None:
        self.sf, self.lim, self.sign = sf, probe.lim, sign
        nh, nl, nb = probe._vh.size, probe._vl.size, probe._br.size
        keep = np.arange(nh + nl + nb + probe._head) if keep is None else keep
        self.vh = probe._vh[keep[keep < nh]]
        self.vl = probe._vl[keep[(keep >= nh) & (keep < nh + nl)] - nh]
        self.br = probe._br[keep[(keep >= nh + nl) & (keep < nh + nl + nb)] - nh - nl]
        self.head = int((keep >= nh + nl + nb).any())
        self._nodes = np.r_[self.vh, self.vl]
        self._m_br = sf.m_br[self.br] if self.br.size else None
        self._i0 = sf.i0_br[self.br] if self.br.size else None

    def __call__(self, state, p_kw: np.ndarray) -> np.ndarray:
        lim, sf = self.lim, self.sf
        v = sf.voltages_pu(state, self._nodes)
        nh = self.vh.size
        parts = [lim.v_hi_pu[self.vh, None] - v[:nh],
                 v[nh:] - lim.v_lo_pu[self.vl, None]]
        if self.br.size:
            i = np.abs(self._i0[:, None] + self._m_br @ state.dv_v)
            parts.append(lim.i_max_a[self.br, None] - i)
        if self.head:  # lossless: the head sees the site's net import
            parts.append((lim.head_p0_kw + self.sign * p_kw - lim.head_min_kw)[None, :])
        m = np.concatenate(parts, axis=0)
        m[:, ~state.converged] = np.nan
        return m


def linear_sizes(sf: SiteFlows, triples, sign: float, lim, criteria, screen: float = 3.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form linear sizes: (p_kw, binding kind, binding element, unit response, rows).

    The unit response ``x1`` (Y nodes x sites, [V per kW of net import]) is returned for
    the model search to start from; ``rows`` are the constraints (indices in
    :class:`ACProbe` order) that bind, linearly, below ``screen`` times some site's linear
    size: the only ones the model search follows (the OpenDSS check sees all).
    """
    n_sites = int(triples[1].max()) + 1
    x1 = sf.unit_response(triples, n_sites)
    v0 = sf.v0_y[:, None]
    a_v = (np.real(np.conj(v0) * x1) / (np.abs(v0) * sf.base_v_y[:, None]))[sf.y_of_eng]
    a_v *= sign  # [pu per kW of device output]
    p_out = np.full(n_sites, criteria.p_max_kw)
    kind = np.full(n_sites, "max_size", dtype=object)
    elem = np.full(n_sites, "", dtype=object)
    v0e = lim.v0_pu
    with np.errstate(divide="ignore", invalid="ignore"):
        u_hi = (lim.v_hi_pu**2 - v0e**2) / (2 * v0e)
        u_lo = (lim.v_lo_pu**2 - v0e**2) / (2 * v0e)
    vh, vl = ~np.isnan(u_hi), ~np.isnan(u_lo)
    br = ~np.isnan(lim.i_max_a)
    names = np.asarray(lim.node_names, dtype=object)
    cands = []
    with np.errstate(divide="ignore", invalid="ignore"):
        cands.append((np.where(a_v[vh] > 0, u_hi[vh, None] / a_v[vh], np.inf),
                      lim.v_hi_kind[vh], names[vh]))
        cands.append((np.where(a_v[vl] < 0, u_lo[vl, None] / a_v[vl], np.inf),
                      lim.v_lo_kind[vl], names[vl]))
        if criteria.thermal and br.any() and sf.m_br is not None:
            # |i0 + c p| = i_max along the complex current change c [A per kW], exactly
            # (the change projected on i0's direction missed a branch that carries
            # almost nothing without the device, its charging current 90 degrees off:
            # IEEE 13's line 671-680 bound at 2,923 kW, the linear size said 4,390)
            i0 = sf.i0_br[br][:, None]
            c = sign * (sf.m_br[br] @ x1)
            a = np.abs(c) ** 2
            b = np.real(np.conj(i0) * c)
            # (a model current a hair above a limit held at its base value: that value)
            cc = np.minimum(np.abs(i0) ** 2 - lim.i_max_a[br, None] ** 2, 0.0)
            disc = b * b - a * cc
            with np.errstate(divide="ignore", invalid="ignore"):
                th = np.where(a > 0, (-b + np.sqrt(disc)) / a, np.inf)
            cands.append((th, np.full(br.sum(), "thermal", dtype=object),
                          lim.branch_names[br].astype(object)))
    if np.isfinite(lim.head_min_kw) and sign < 0:  # lossless: the head sees -P
        cands.append((np.full((1, n_sites), lim.head_p0_kw - lim.head_min_kw),
                      np.array(["reverse_power"], dtype=object),
                      np.array(["feeder_head"], dtype=object)))
    for ratio, kinds, elems in cands:
        if ratio.shape[0] == 0:
            continue
        ratio = np.maximum(ratio, 0.0)
        k = np.argmin(ratio, axis=0)
        best = ratio[k, np.arange(n_sites)]
        better = best < p_out
        p_out = np.where(better, best, p_out)
        kind = np.where(better, kinds[k], kind)
        elem = np.where(better, elems[k], elem)
    close = [(np.maximum(r, 0.0) <= screen * np.maximum(p_out, criteria.tol_kw)).any(axis=1)
             for r, _, _ in cands if r is not None]
    if not np.isfinite(lim.head_min_kw):
        pass
    elif sign > 0:  # the probe keeps a head row; load adds import, never binds it
        close.append(np.array([False]))
    rows = np.flatnonzero(np.concatenate(close)) if close else np.zeros(0, np.int64)
    return p_out, kind, elem, x1, rows


def _secant(p_a, m_a, p_b, m_b) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the smallest size where a margin's secant crosses zero, and which."""
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (m_b - m_a) / (p_b - p_a)
        root = np.where(slope < 0, p_b - m_b / slope, np.inf)
    root = np.where(np.isnan(root), np.inf, root)
    k = np.argmin(root, axis=0)
    return root[k, np.arange(root.shape[1])], k


def model_sizes(sf: SiteFlows, triples, sign: float, p_lin: np.ndarray, x1: np.ndarray,
                margins: ModelMargins, m0: np.ndarray, criteria, max_rounds: int = 8
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Largest model-AC-feasible size per site [kW], its margins, binding constraint index.

    Same bracketed secant as :func:`derms.analysis.hosting_capacity.verify_site`, all
    sites at once, each round one batched chord-Newton solve of the sites still open
    (warm-started from their last solution, scaled); a solve that does not converge is
    taken as a violation, and the site is flagged ``unsure``: the chord iteration fails
    on large injections that OpenDSS still solves (EPRI ckt7: above ~700 kW at sites
    hosting 7 MW), so its size is a lower bound only and must be checked on OpenDSS.
    Stops per site when a feasible size's own secant root lies within
    :data:`MODEL_REL_TOL` (+ ``tol_kw``) of it. Returns (sizes, their margins, binding
    constraint index, unsure).
    """
    k = p_lin.size
    p_max, tol, rel = criteria.p_max_kw, criteria.tol_kw, MODEL_REL_TOL
    lo, hi = np.zeros(k), np.full(k, np.inf)
    m_lo = np.repeat(m0[:, None], k, axis=1)
    prev_p, prev_m = np.zeros(k), m_lo.copy()
    p = np.clip(p_lin, tol, p_max)
    dv = x1 * (sign * p)
    open_ = np.ones(k, dtype=bool)
    unsure = np.zeros(k, dtype=bool)
    for _ in range(max_rounds):
        a = np.flatnonzero(open_)
        if a.size == 0:
            break
        st = sf.solve(sub_columns(triples, a, k), sign * p[a], dv[:, a], tol_pu=5e-5)
        m = margins(st, p[a])
        valid = st.converged
        ok = valid & (np.nan_to_num(m, nan=-1.0) >= -1e-9).all(axis=0)
        pa = p[a]
        lo[a[ok]] = pa[ok]
        m_lo[:, a[ok]] = m[:, ok]
        hi[a[~ok]] = pa[~ok]
        unsure[a[~valid]] = True
        est, _ = _secant(prev_p[a], prev_m[:, a], pa, m)
        est = np.where(valid & (pa != prev_p[a]), est, np.nan)
        done = ok & ((pa >= p_max) | (est <= pa * (1 + rel) + tol))
        done |= hi[a] - lo[a] <= np.maximum(tol, rel * lo[a])
        prev_p[a[valid]] = pa[valid]
        prev_m[:, a[valid]] = m[:, valid]
        est = np.where(ok, est * (1 + rel / 2), est * (1 - rel / 2))
        step = 0.9 * np.maximum(tol, rel * lo[a])
        fin = np.isfinite(est) & (lo[a] < est) & (est < np.minimum(hi[a], 2 * p_max))
        nxt = np.where(fin, np.minimum(np.minimum(np.maximum(est, lo[a] + step), hi[a] - step),
                                       p_max),
                       np.where(np.isfinite(hi[a]), (lo[a] + hi[a]) / 2,
                                np.minimum(2 * pa, p_max)))
        go = a[~done]
        sub = ~done
        scale = nxt[sub] / pa[sub]
        dv[:, go] = np.where(valid[sub], st.dv_v[:, sub] * scale, x1[:, go] * (sign * nxt[sub]))
        p[a] = nxt
        open_[a[done]] = False
    _, bind = _secant(np.zeros(k), np.repeat(m0[:, None], k, axis=1),
                      np.maximum(lo, 1e-9), m_lo)
    return lo, m_lo, bind, unsure
