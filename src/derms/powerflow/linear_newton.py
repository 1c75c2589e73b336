"""Many single-site AC solves at once, on the linear model's factorised Jacobian.

For studies that ask the same question at many sites one at a time (hosting capacity:
"how much can this bus take?"), each scenario is one site's injection on top of a frozen
operating point. :class:`SiteFlows` factorises the network Jacobian of the operating point
once (:mod:`derms.powerflow.network_jacobian`, same model as
:func:`derms.powerflow.linear.build_linear_model`) and solves the AC power flow of every
scenario together, one column per site, by chord (fixed-Jacobian Newton) iterations:

``J dV_{k+1} = -I_inj(V0 + dV_k) - N(dV_k)``

where ``I_inj`` is the scenario's constant-power injection current drawn at its nodes
(``conj(S / V)``, the same element as the AC check of
:func:`derms.powerflow.linear.solve_ac_with_injections`) and ``N`` the non-linear part of
every load's, generator's and PV system's current by its own OpenDSS law and voltage region
(:func:`derms.powerflow.linear_loads.branch_power`), minus the part the Jacobian already
holds. The fixed point is the AC solution (the Jacobian only sets the convergence rate):
the first iterate is the linear model's answer, each further one removes most of its
curvature error. Controls are frozen (taps, capacitor states, as the Jacobian holds them);
generators and PV systems stay constant power; the Vsource is its Norton equivalent.

Sign convention: powers are net import at the node (DESIGN), consumption positive; a PV
site exporting ``P`` kW is ``-P``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from derms.errors import ConvergenceError, ModelError
from derms.powerflow.collect import NetworkIndex
from derms.powerflow.linear import _node_bases_v
from derms.powerflow.linear_branches import branch_current_matrix
from derms.powerflow.linear_loads import (
    Branches,
    branch_jacobian,
    branch_power,
    branch_voltage,
    read_branches,
)
from derms.powerflow.network_jacobian import LeafSolver, complex_pairs, network_jacobian
from derms.powerflow.voltage_measure import term_nodes

# Leaf-bus elimination before SuperLU (LeafSolver) pays off on large feeders with many
# secondaries: IEEE 8500 (≈ 8,500 Y nodes), 130-column solve 30 ms with 6 rounds against
# 76 ms without. On small ones plain SuperLU wins: IEEE 123 (278 Y nodes) set-up 1.6 ms
# against 7.0 ms, for + 0.6 ms per 130-column solve (≈ 5 such solves per study).
_LEAF_MIN_NODES = 1000
_LEAF_ROUNDS = 6


@dataclass(frozen=True)
class SiteState:
    """AC state of ``k`` site scenarios: node-voltage change ``dv_v`` (n_y_nodes, k)
    [V, complex, Y-node order] and whether each column's iterations converged."""

    dv_v: np.ndarray
    converged: np.ndarray


class SiteFlows:
    """Factorised operating point of a solved, frozen engine, for batched site scenarios.

    Parameters
    ----------
    engine : OpenDSSEngine
        Solved (snapshot), controls frozen; only read.
    index : NetworkIndex
        Names the branch conductors (rows of :meth:`branch_currents_a`).
    branches : bool
        Also prepare branch-current readouts.
    load_band_pu : float
        Secant band of the loads' voltage dependence in the Jacobian (as in
        :func:`~derms.powerflow.linear.build_linear_model`; it changes the convergence
        rate, not the fixed point).
    """

    def __init__(self, engine, index: NetworkIndex, *, branches: bool = True,
                 load_band_pu: float = 0.05) -> None:
        ckt = engine.circuit
        if not ckt.Solution.Converged:
            raise ConvergenceError("SiteFlows needs a solved engine (solve it first)")
        names = engine.node_names()
        pos = {s: k for k, s in enumerate(names)}
        y_names = [s.lower() for s in ckt.YNodeOrder]
        self.eng_of_y = np.fromiter((pos[s] for s in y_names), dtype=np.int64,
                                     count=len(y_names))  # engine node of each Y node
        self.y_of_eng = np.argsort(self.eng_of_y)       # Y node of each engine node
        self.names, self._pos = names, pos
        self.v_pair = engine.voltage_pairs()  # line-to-line partner (engine order) or -1
        v_y = complex_pairs(ckt.YNodeVarray)
        self.n = v_y.size
        self.v0_y = v_y
        br = read_branches(engine, v_y)
        jac = network_jacobian(engine, v_y, br, load_band_pu)
        bus = np.unique([s.rsplit(".", 1)[0] for s in y_names], return_inverse=True)[1]
        rounds = _LEAF_ROUNDS if self.n >= _LEAF_MIN_NODES else 0
        self.solver = LeafSolver(jac.tocsr(), np.repeat(bus, 2), max_rounds=rounds)
        self.base_v_y = _node_bases_v(engine)[self.eng_of_y]
        # element laws: currents at the operating point and their linear part in J
        live = branch_voltage(v_y, br) != 0
        self.br = _select(br, live)
        vd0 = branch_voltage(v_y, self.br)
        a, b = branch_jacobian(self.br, vd0, load_band_pu)
        self._a, self._b = a + self.br.y_sys_s, b
        self._vd0 = vd0
        s0 = branch_power(self.br, np.abs(vd0))[0]
        self._i0 = np.conj(s0 / vd0)
        # laws 1 (PQ), 2 (Z), 5 (I) are S = c m^k in their normal voltage region and
        # constant Z above Vmaxpu (S = c_hi m^2; OpenDSS's Load.pas, as branch_power)
        bb = self.br
        vb = bb.v_base_v
        self._lo_v = np.maximum(bb.vmin_pu, bb.vlow_pu) * vb
        self._hi_v = bb.vmax_pu * vb
        s_nom = bb.w_nom_w + 1j * bb.var_nom_var
        vmx = np.where(bb.vmax_pu != 0, bb.vmax_pu, 1.0)
        self._simple = np.isin(bb.model, (1, 2, 5))
        self._coef = np.where(bb.model == 2, s_nom / vb**2,
                              np.where(bb.model == 5, s_nom / vb, s_nom))
        self._power = np.select([bb.model == 2, bb.model == 5], [2, 1], 0)
        self._coef_hi = s_nom / vb**2 / np.select([bb.model == 1, bb.model == 5],
                                                   [vmx**2, vmx], 1.0)
        # branch incidence (Y nodes x branches): +1 at node_i, -1 at node_j (ground dropped)
        ni, nj = bb.node_i, bb.node_j
        ib = np.arange(ni.size)
        self._inc = sp.csr_matrix(
            (np.r_[np.ones(int((ni >= 0).sum())), -np.ones(int((nj >= 0).sum()))],
             (np.r_[ni[ni >= 0], nj[nj >= 0]], np.r_[ib[ni >= 0], ib[nj >= 0]])),
            shape=(self.n, ni.size))
        self._inc_t = self._inc.T.tocsr()
        self.m_br = None
        if branches:
            self.m_br = branch_current_matrix(engine, index, y_order=True)[0]
            self.i0_br = self.m_br @ v_y

    # ------------------------------------------------------------------ scenarios
    def site_matrix(self, sites: Sequence[Sequence[str]]) -> tuple[np.ndarray, ...]:
        """(Y node, column, weight, return Y node) entries splitting each site's power
        equally over its terms: "bus.node" (to ground: return -1) or "bus.a.b" (between
        two nodes, drawn from a into b)."""
        rows, cols, w, to = [], [], [], []
        for j, terms in enumerate(sites):
            for s in terms:
                ks = [self._pos.get(e) for e in term_nodes(s)]
                if not ks or any(k is None for k in ks):
                    raise ModelError(f"unknown node {s!r} (expected 'bus.node' or 'bus.a.b')")
                rows.append(self.y_of_eng[ks[0]])
                to.append(self.y_of_eng[ks[1]] if len(ks) == 2 else -1)
                cols.append(j)
                w.append(1.0 / len(terms))
        return (np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(w),
                np.asarray(to, np.int64))

    def _solve(self, rhs: np.ndarray) -> np.ndarray:
        """J^-1 rhs for complex node-current columns (n, k), Y order."""
        k = rhs.shape[1]
        b = np.empty((2 * self.n, k))
        p = self.solver.pos
        b[p[0::2]] = rhs.real
        b[p[1::2]] = rhs.imag
        x = self.solver.solve(b)
        return x[p[0::2]] + 1j * x[p[1::2]]

    def _inj_current(self, triples, p_kw: np.ndarray, dv: np.ndarray) -> np.ndarray:
        rows, cols, w, to = triples
        s_va = 1000.0 * w * p_kw[cols]
        v = self.v0_y[rows] + dv[rows, cols]
        two = to >= 0
        if two.any():  # between two nodes: the voltage across, and the return current
            t2 = to[two]
            v[two] -= self.v0_y[t2] + dv[t2, cols[two]]
        cur = np.conj(s_va / v)
        out = np.zeros(dv.shape, dtype=complex)
        np.add.at(out, (rows, cols), cur)
        if two.any():
            np.add.at(out, (to[two], cols[two]), -cur[two])
        return out

    def _nonlinear(self, dv: np.ndarray) -> np.ndarray:
        """Element currents beyond the Jacobian's linear part, per node (n, k)."""
        br = self.br
        if br.node_i.size == 0:
            return np.zeros_like(dv)
        dvd = self._inc_t @ dv
        vd = self._vd0[:, None] + dvd
        m = np.abs(vd)
        fast = self._simple[:, None] & (m > self._lo_v[:, None])
        hi = m > self._hi_v[:, None]
        pw = np.where(hi, 2, self._power[:, None])
        s = (np.where(hi, self._coef_hi[:, None], self._coef[:, None])
             * np.where(pw == 2, m * m, np.where(pw == 1, m, 1.0)))
        if not fast.all():  # other laws and regions: the general law, on those entries
            ib, ic = np.nonzero(~fast)
            s[ib, ic] = branch_power(_select(br, ib), m[ib, ic])[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            cur = np.conj(s / vd)
        nl = cur - self._i0[:, None] - self._a[:, None] * dvd - self._b[:, None] * np.conj(dvd)
        nl = np.where(np.isfinite(nl), nl, 0.0)
        return self._inc @ nl

    def unit_response(self, triples, k: int) -> np.ndarray:
        """The linear model: node-voltage change [V per kW of net import, complex, Y order]
        of each of the ``k`` columns (the first chord step from the operating point)."""
        return self._solve(-self._inj_current(triples, np.ones(k),
                                              np.zeros((self.n, k), dtype=complex)))

    def solve(self, triples, p_kw: np.ndarray, dv: np.ndarray | None = None, *,
              max_iter: int = 6, tol_pu: float = 1e-6) -> SiteState:
        """AC state of every column with its site at ``p_kw`` [kW net import, per column].

        ``dv``: a starting change (e.g. a nearby solution); None starts from the linear
        model's answer. Columns whose iterations grow or stall are flagged not converged.
        """
        p_kw = np.asarray(p_kw, dtype=float)
        k = p_kw.size
        dv = np.zeros((self.n, k), dtype=complex) if dv is None else dv.copy()
        conv = np.zeros(k, dtype=bool)
        step_prev = np.full(k, np.inf)
        act = np.arange(k)  # columns still iterating (converged or diverged ones stop)
        inv_base = 1.0 / self.base_v_y[:, None]
        for _ in range(max_iter):
            tr = triples if act.size == k else sub_columns(triples, act, k)
            d = dv[:, act]
            rhs = -self._inj_current(tr, p_kw[act], d) - self._nonlinear(d)
            new = self._solve(rhs)
            step = np.max(np.abs(new - d) * inv_base, axis=0)
            step = np.where(np.isfinite(step), step, np.inf)
            dv[:, act] = new
            c = step <= tol_pu
            conv[act] = c
            bad = ~np.isfinite(step) | (step > 0.9 * step_prev[act]) & (step > 1e-3)
            step_prev[act] = step
            act = act[~(c | bad)]
            if act.size == 0:
                break
        return SiteState(dv, conv)

    # ------------------------------------------------------------------ readouts
    def voltages_pu(self, state: SiteState, nodes: np.ndarray | None = None) -> np.ndarray:
        """|V| [pu] per engine node (rows; ``nodes`` = engine node indices, None = all)
        and column."""
        e = np.arange(self.y_of_eng.size) if nodes is None else np.asarray(nodes)
        r = self.y_of_eng[e]
        out = np.abs(self.v0_y[r, None] + state.dv_v[r]) / self.base_v_y[r, None]
        ll = np.flatnonzero(self.v_pair[e] >= 0)
        if ll.size:  # ungrounded areas: line to line (derms.powerflow.voltage_measure)
            ra, rb = r[ll], self.y_of_eng[self.v_pair[e[ll]]]
            vd = self.v0_y[ra, None] + state.dv_v[ra] - self.v0_y[rb, None] - state.dv_v[rb]
            out[ll] = np.abs(vd) / (np.sqrt(3.0) * self.base_v_y[ra, None])
        return out

    def branch_currents_a(self, state: SiteState) -> np.ndarray:
        """|I| [A] per branch conductor (NetworkIndex rows) and column."""
        return np.abs(self.i0_br[:, None] + self.m_br @ state.dv_v)


def sub_columns(triples, cols: np.ndarray, k: int):
    """The entries of :meth:`SiteFlows.site_matrix` restricted to
    the columns ``cols`` (of ``k``), renumbered 0..len(cols)-1 in that order."""
    rows, c, w, to = triples
    new = np.full(k, -1)
    new[cols] = np.arange(cols.size)
    keep = new[c] >= 0
    return rows[keep], new[c[keep]], w[keep], to[keep]


def _select(br: Branches, keep: np.ndarray) -> Branches:
    return Branches(**{f: getattr(br, f)[keep] for f in Branches.__slots__})

