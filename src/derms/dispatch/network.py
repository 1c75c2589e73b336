"""Network rows of the dispatch LP: voltages, branch currents, head import (peak, export).

The network part is ``V_t = V_ref_t + S (P_t - P_ref_t)`` in the linear model's u-form
(``u = (|V|^2 - |V_ref|^2) / (2 |V_ref|)``, :mod:`derms.powerflow.linear`): ``S`` (node
voltages and branch currents per kW/kvar of each DER's net import) is evaluated once, at
the feeder's base (peak) load with controls frozen; ``V_ref_t``/``I_ref_t``/head import are
the AC QSTS result of a reference schedule (first the uncontrolled one, then each
AC-verified plan), so a re-linearisation only changes row bounds. Rows exist only for
(interval, element) pairs that can bind: the reachable ones (linear model over the DER
box) that are near their limit at the reference, plus those a solution violates in the
linear prediction or in the AC check (added lazily).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from derms.analysis.constraints import Limits
from derms.der.models import Fleet, FleetArrays
from derms.dispatch.lp import INF, HighsLP, Layout, RowBlock
from derms.powerflow.linear import LinearModel

V_KINDS = ("v_max", "v_min")


@dataclass(frozen=True)
class DerSensitivity:
    """Sensitivities per DER (columns in fleet order) of node |V| [pu/kW, u-form] and branch
    |I| [A/kW] to net import (consumption positive); a DER's power is shared equally by
    its phase nodes. Stored as CSR: products with them then never go through the
    multi-threaded BLAS, which on a loaded 2-core machine made 100 x 300 products take
    15 ms each."""

    hv_p: sp.csr_matrix
    hv_q: sp.csr_matrix
    hi_p: sp.csr_matrix
    hi_q: sp.csr_matrix


def der_sensitivity(lin: LinearModel, fleet: Fleet) -> DerSensitivity:
    pos = {n: k for k, n in enumerate(lin.injection_nodes)}
    rows, cols, vals = [], [], []
    for j, d in enumerate(fleet.ders):
        nodes = d.connection.injection_nodes
        for n in nodes:
            rows.append(pos[n])
            cols.append(j)
            vals.append(1.0 / len(nodes))
    W = sp.csr_matrix((vals, (rows, cols)), shape=(len(lin.injection_nodes), len(fleet.ders)))
    b = lin.branches
    W = W.tocsc()

    def sparse(m: np.ndarray) -> sp.csr_matrix:  # sparse products: no threaded BLAS calls
        return sp.csr_matrix((W.T @ m.T).T)

    return DerSensitivity(sparse(lin.dv_dp_pu_per_kw), sparse(lin.dv_dq_pu_per_kvar),
                          sparse(b.di_dp_a_per_kw), sparse(b.di_dq_a_per_kvar))


@dataclass(frozen=True)
class Reference:
    """An AC-solved schedule: DER net import ``p_kw``/``q_kvar`` (T, n_der), node ``v_pu``
    (T, n_nodes), branch ``i_a`` (T, n_branch_conductors), head import ``head_kw`` (T,)."""

    p_kw: np.ndarray
    q_kvar: np.ndarray
    v_pu: np.ndarray
    i_a: np.ndarray
    head_kw: np.ndarray


@dataclass(frozen=True)
class NetworkLimits:
    """Per interval and element limits, pre-existing violations held at the base case:
    ``v_max``/``v_min`` (T, n_nodes) [pu], ``i_max`` (T, n_br) [A] (inf: no rating),
    ``node_ok`` (n_nodes,) phase nodes that are energised in the base case."""

    v_max: np.ndarray
    v_min: np.ndarray
    i_max: np.ndarray
    node_ok: np.ndarray


def network_limits(base: Reference, node_phase: np.ndarray, rating_a: np.ndarray,
                   limits: Limits) -> NetworkLimits:
    """Limits as in DESIGN.md "Definitions", relative to the base case ``base``."""
    v = base.v_pu
    hi_tol, lo_tol = limits.v_max_pu + limits.v_tol_pu, limits.v_min_pu - limits.v_tol_pu
    v_max = np.where(v > hi_tol, v, limits.v_max_pu)
    v_min = np.where((v < lo_tol) & (v >= limits.energised_min_pu), v, limits.v_min_pu)
    rated = np.where(rating_a > 0, rating_a * limits.thermal_pct / 100.0, INF)
    pre = base.i_a > rated * (1 + limits.thermal_tol_pct / limits.thermal_pct)
    i_max = np.where(pre, base.i_a, rated)
    node_ok = (node_phase <= 3) & (v.min(axis=0) >= limits.energised_min_pu)
    return NetworkLimits(v_max, v_min, i_max, node_ok)


def der_box(a: FleetArrays, allow_q: bool) -> tuple[np.ndarray, ...]:
    """Range of each DER's net import per interval: (p_lo, p_hi, q_lo, q_hi), (T, n_der)."""
    T = a.pv_avail_kw.shape[0]
    bc = np.broadcast_to
    nb, ne, ng = a.bat_p_max_kw.size, a.ev_p_max_kw.size, a.gen_p_max_kw.size
    p_lo = np.column_stack([-a.pv_avail_kw, -bc(a.bat_p_max_kw, (T, nb)), np.zeros((T, ne)),
                            a.flex_base_kw - a.flex_shed_max_kw, -bc(a.gen_p_max_kw, (T, ng))])
    p_hi = np.column_stack([np.zeros_like(a.pv_avail_kw), bc(a.bat_p_max_kw, (T, nb)),
                            a.ev_p_max_kw * a.ev_window, a.flex_base_kw + a.flex_rebound_max_kw,
                            -bc(a.gen_p_min_kw, (T, ng))])
    q = a.pv_q_max_kvar if allow_q else np.zeros_like(a.pv_q_max_kvar)
    q_hi = np.zeros_like(p_lo)
    q_hi[:, :q.shape[1]] = q
    return p_lo, p_hi, -q_hi, q_hi


class NetworkRows:
    """The reference-centred rows of one LP and their bookkeeping (see module docstring).

    ``margin`` arrays (T, n) tighten single rows [pu or A] where the AC check found the
    linear model optimistic.
    """

    def __init__(self, lp: HighsLP, lay: Layout, sens: DerSensitivity, ep: sp.csr_matrix,
                 eq: sp.csr_matrix, cp: np.ndarray, lim: NetworkLimits,
                 box: tuple[np.ndarray, ...], export_limit_kw: float | None,
                 node_names: np.ndarray, branch_names: np.ndarray, near_pu: float = 0.01,
                 near_frac: float = 0.1) -> None:
        self.lp, self.lay, self.cp, self.lim = lp, lay, cp, lim
        self.sens, self.near_pu, self.near_frac = sens, near_pu, near_frac
        self.g = {"v": sp.csr_matrix(sens.hv_p @ ep + sens.hv_q @ eq),
                  "i": sp.csr_matrix(sens.hi_p @ ep + sens.hi_q @ eq)}
        self.g["v"].eliminate_zeros()
        self.g["i"].eliminate_zeros()
        self.names = {"v_max": node_names, "v_min": node_names, "i_max": branch_names}
        T = lay.T
        self.row = {k: np.full((T, len(n)), -1, dtype=np.int64) for k, n in self.names.items()}
        self.margin = {k: np.zeros((T, len(n))) for k, n in self.names.items()}
        self.box = box
        self.export_limit_kw = export_limit_kw
        g_head = np.asarray(ep.sum(axis=0)).ravel()
        t = np.arange(T)
        nz = np.flatnonzero(g_head)
        r = np.repeat(t, nz.size + 1)
        c = np.c_[t[:, None] * lay.nv + nz[None, :], np.full(T, lay.z)].ravel()
        v = np.tile(np.r_[g_head[nz], -1.0], T)
        A = sp.csr_matrix((v, (r, c)), shape=(T, lay.n_cols))
        self.peak_rows = lp.add_rows(RowBlock(A, np.full(T, -INF), np.zeros(T),
                                              np.full(T, "peak", dtype=object),
                                              np.full(T, "feeder_head", dtype=object), t))
        self.export_rows = np.zeros(0, dtype=np.int64)
        if export_limit_kw is not None:
            A2 = sp.csr_matrix((np.tile(g_head[nz], T), (np.repeat(t, nz.size),
                                (t[:, None] * lay.nv + nz[None, :]).ravel())),
                               shape=(T, lay.n_cols))
            self.export_rows = lp.add_rows(RowBlock(A2, np.zeros(T), np.full(T, INF),
                                                    np.full(T, "export_limit", dtype=object),
                                                    np.full(T, "feeder_head", dtype=object), t))
        self.ref: Reference | None = None

    # -- reference and bounds ------------------------------------------------------------
    def rhs(self, kind: str) -> np.ndarray:
        """Right-hand side (T, n) of every potential row of ``kind`` at the reference."""
        ref, lim, m = self.ref, self.lim, self.margin[kind]
        if kind == "i_max":
            off = (ref.p_kw - self.cp) @ self.sens.hi_p.T + ref.q_kvar @ self.sens.hi_q.T
            return lim.i_max - m - ref.i_a + off
        off = (ref.p_kw - self.cp) @ self.sens.hv_p.T + ref.q_kvar @ self.sens.hv_q.T
        v0 = np.maximum(ref.v_pu, 1e-6)
        v_lim = lim.v_max - m if kind == "v_max" else lim.v_min + m
        return (v_lim**2 - v0**2) / (2 * v0) + off

    def set_reference(self, ref: Reference) -> None:
        """Re-centre every network row at an AC-solved schedule (bounds only)."""
        self.ref = ref
        for kind, rows in self.row.items():
            sel = rows >= 0
            if sel.any():
                b = self.rhs(kind)[sel]
                if kind == "v_min":
                    self.lp.set_row_bounds(rows[sel], b, np.full(b.size, INF))
                else:
                    self.lp.set_row_bounds(rows[sel], np.full(b.size, -INF), b)
        h0 = ref.head_kw - (ref.p_kw - self.cp).sum(axis=1)
        T = self.lay.T
        self.lp.set_row_bounds(self.peak_rows, np.full(T, -INF), -h0)
        if self.export_rows.size:
            self.lp.set_row_bounds(self.export_rows, -self.export_limit_kw - h0,
                                   np.full(T, INF))

    def lhs(self, kind: str, x: np.ndarray) -> np.ndarray:
        """Linear row values (T, n) of every potential row at solution ``x``."""
        xt = x[: self.lay.z].reshape(self.lay.T, self.lay.nv)
        return (self.g["i" if kind == "i_max" else "v"] @ xt.T).T

    def reachable(self, kind: str) -> np.ndarray:
        """(T, n) rows whose limit the DER box can reach (linear model, from the reference)."""
        p_lo, p_hi, q_lo, q_hi = self.box
        ref = self.ref
        dp_lo, dp_hi, dq_lo, dq_hi = p_lo - ref.p_kw, p_hi - ref.p_kw, q_lo - ref.q_kvar, \
            q_hi - ref.q_kvar
        hp, hq = ((self.sens.hi_p, self.sens.hi_q) if kind == "i_max"
                  else (self.sens.hv_p, self.sens.hv_q))
        sign = -1.0 if kind == "v_min" else 1.0
        hp, hq = sign * hp, sign * hq
        reach = (dp_hi @ hp.maximum(0).T + dp_lo @ hp.minimum(0).T
                 + dq_hi @ hq.maximum(0).T + dq_lo @ hq.minimum(0).T)
        slack = self._slack_at_ref(kind)
        ok = self._ok(kind)
        return ok & (reach >= slack - 1e-9)

    def _ok(self, kind: str) -> np.ndarray:
        if kind == "i_max":
            return np.isfinite(self.lim.i_max)
        return np.broadcast_to(self.lim.node_ok, self.row[kind].shape)

    def _slack_at_ref(self, kind: str) -> np.ndarray:
        """Distance to the limit at the reference, in row units (u [pu] or A), >= 0 inside."""
        ref = self.ref
        off = self.rhs(kind)
        at_ref = ((ref.p_kw - self.cp) @ (self.sens.hi_p if kind == "i_max" else
                                          self.sens.hv_p).T
                  + ref.q_kvar @ (self.sens.hi_q if kind == "i_max" else self.sens.hv_q).T)
        return at_ref - off if kind == "v_min" else off - at_ref

    def initial_rows(self) -> int:
        """Add the reachable rows that are near their limit at the reference."""
        n = 0
        for kind in self.row:
            slack = self._slack_at_ref(kind)
            if kind == "i_max":
                near = slack <= self.near_frac * np.where(np.isfinite(self.lim.i_max),
                                                          self.lim.i_max, 0.0)
            else:
                near = slack <= self.near_pu
            n += self.add(kind, self.reachable(kind) & near)
        return n

    def add(self, kind: str, mask: np.ndarray) -> int:
        """Add rows for the (t, element) pairs in ``mask`` that are not in the LP yet."""
        mask = mask & (self.row[kind] < 0) & self._ok(kind)
        t, e = np.nonzero(mask)
        if t.size == 0:
            return 0
        G = self.g["i" if kind == "i_max" else "v"][e].tocsr()
        G.indices = (G.indices + np.repeat(t * self.lay.nv, np.diff(G.indptr))).astype(np.int32)
        G = sp.csr_matrix((G.data, G.indices, G.indptr), shape=(t.size, self.lay.n_cols))
        b = self.rhs(kind)[t, e]
        lo, hi = (b, np.full(b.size, INF)) if kind == "v_min" else (np.full(b.size, -INF), b)
        idx = self.lp.add_rows(RowBlock(G, lo, hi, np.full(t.size, kind, dtype=object),
                                        self.names[kind][e].astype(object), t))
        self.row[kind][t, e] = idx
        return int(t.size)

    def add_violated(self, x: np.ndarray, tol: float = 1e-6) -> int:
        """Lazy rows: add every (t, element) the linear model says ``x`` violates."""
        n = 0
        for kind in self.row:
            val, b = self.lhs(kind, x), self.rhs(kind)
            bad = (val < b - tol) if kind == "v_min" else (val > b + tol)
            n += self.add(kind, bad)
        return n
