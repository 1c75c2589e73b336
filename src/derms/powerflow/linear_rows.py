"""Sensitivities of *chosen* network rows to net-import P and Q at injection points, at the
engine's present solved operating point, by **adjoint** solves of the sparse KCL Jacobian
(:mod:`derms.powerflow.network_jacobian`).

Rows are node voltage magnitudes and branch-conductor current magnitudes; one solve per
row, never one per injection point, so the cost follows the number of rows that matter
(tens to hundreds), not the fleet (10,000 DERs share about 1,200 injection points on IEEE
8500). No nodes x nodes or nodes x points matrix is formed; the result is rows x points.
Voltage rows are per kW in ``u = (|V|^2 - |V0|^2) / (2 |V0|)`` as in
:mod:`derms.powerflow.linear` (``du/dp = d|V|/dp`` at ``V0``); current rows in ``|I|`` [A].
Checked against :func:`derms.powerflow.linear.build_linear_model` to 1e-14
(``tests/validation/test_corrective.py``). Sign: P and Q are net import (consumption
positive).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from derms.errors import ModelError
from derms.powerflow.collect import NetworkIndex
from derms.powerflow.linear_branches import branch_current_matrix
from derms.powerflow.linear_loads import read_branches
from derms.powerflow.network_jacobian import (
    LeafSolver,
    adjoint_rows,
    complex_pairs,
    network_jacobian,
    y_bases_v,
)
from derms.powerflow.voltage_measure import partners_in, term_nodes


class RowSensitivities:
    """Adjoint sensitivities of chosen rows to P/Q at injection points (see the module docstring).

    Parameters
    ----------
    engine : OpenDSSEngine
        Compiled; taps and capacitors frozen (``controlmode=off``) at their field state.
    points : sequence of sequences of "bus.node" or "bus.a.b"
        Injection points: a DER at point ``k`` shares its power equally (or by
        ``weights[k]``, summing to 1: an aggregated DER spread over its members) over the point's
        terms, node to ground or between two nodes (as
        :attr:`derms.der.models.Connection.injection_terminals`). Voltage rows of nodes on
        ungrounded areas are line to line (:mod:`derms.powerflow.voltage_measure`).
    index : NetworkIndex
        Names the branch-conductor rows (:func:`derms.powerflow.collect.build_index`).

    The branch-current map ``I = M V`` (element Yprim at the present taps) is built once
    here; build a new object after a tap or topology change.
    """

    def __init__(self, engine, points: Sequence[Sequence[str]], index: NetworkIndex,
                 weights: Sequence[Sequence[float]] | None = None) -> None:
        ckt = engine.circuit
        names = engine.node_names()
        y_names = [s.lower() for s in ckt.YNodeOrder]
        ypos = {s: k for k, s in enumerate(y_names)}
        self.n = len(y_names)
        self.y_of_e = np.fromiter((ypos[s] for s in names), dtype=np.int64, count=len(names))
        rows, to, cols, vals = [], [], [], []
        for k, terms in enumerate(points):
            terms = [str(s).strip().lower() for s in terms]
            ends = [term_nodes(t) for t in terms]
            missing = [t for t, e in zip(terms, ends, strict=True)
                       if not e or any(x not in ypos for x in e)]
            if not terms or missing:
                raise ModelError(f"injection point {k}: unknown node(s) "
                                 f"{missing[:3] or '(none given)'}")
            rows += [ypos[e[0]] for e in ends]
            to += [ypos[e[1]] if len(e) == 2 else -1 for e in ends]
            cols += [k] * len(terms)
            vals += (list(weights[k]) if weights is not None
                     else [1.0 / len(terms)] * len(terms))
        self.n_points = len(points)
        self._term = (np.asarray(rows, np.int64), np.asarray(to, np.int64),
                      np.asarray(cols, np.int64), np.asarray(vals, float))
        # ungrounded areas: line-to-line voltage rows
        self._ll_y = partners_in(engine.voltage_pairs(), self.y_of_e, self.n)
        m_br, self.index = branch_current_matrix(engine, index)
        coo = m_br.tocoo()
        self.m_y = sp.csr_matrix((coo.data, (coo.row, self.y_of_e[coo.col])),
                                 shape=(m_br.shape[0], self.n))
        bus = np.unique([s.rsplit(".", 1)[0] for s in y_names], return_inverse=True)[1]
        self._bus2 = np.repeat(bus, 2)

    def compute(self, engine, v_nodes: np.ndarray, branches: np.ndarray, *,
                load_band_pu: float = 0.05) -> tuple[np.ndarray, ...]:
        """:meth:`linearise` at the engine's present solution, then :meth:`rows`."""
        self.linearise(engine, load_band_pu=load_band_pu)
        return self.rows(v_nodes, branches)

    def linearise(self, engine, *, load_band_pu: float = 0.05) -> None:
        """Factorise the (transposed) KCL Jacobian at the engine's present solution; later
        :meth:`rows` calls use this point even if the engine is re-solved meanwhile."""
        ckt = engine.circuit
        if not ckt.Solution.Converged:
            raise ModelError("row sensitivities need a solved engine")
        v_y = complex_pairs(ckt.YNodeVarray)
        br = read_branches(engine, v_y)
        jac = network_jacobian(engine, v_y, br, load_band_pu)
        self._solver = LeafSolver(jac.T.tocsr(), self._bus2, max_rounds=64, chains=True)
        self._v_y = v_y
        self._base = y_bases_v(engine, self.y_of_e, self.n)
        self._cache_v: dict[int, tuple] = {}
        self._cache_i: dict[int, tuple] = {}
        # E (2n x 2 n_points): current injected per kW / kvar of net import at each point;
        # 1 kW at a node injects -conj(1000 / V) (as in linear.py); between two nodes
        # -conj(1000 / (V_a - V_b)) at a and the opposite at b
        rows, to, cols, share = self._term
        vd = v_y[rows] - np.where(to >= 0, v_y[np.maximum(to, 0)], 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cur_p = np.where(np.abs(vd) > 0, -1000.0 / np.conj(vd), 0.0)
        two = to >= 0
        node = np.r_[rows, to[two]]
        col = np.r_[cols, cols[two]]
        blocks = []
        for cu in (cur_p, -1j * cur_p):
            w = np.r_[cu * share, -(cu * share)[two]]
            blocks.append(sp.csc_matrix(
                (np.r_[w.real, w.imag], (np.r_[2 * node, 2 * node + 1], np.r_[col, col])),
                shape=(2 * self.n, self.n_points)))
        self._inj = sp.hstack(blocks).tocsc()

    def rows(self, v_nodes: np.ndarray, branches: np.ndarray) -> tuple[np.ndarray, ...]:
        """Sensitivities of chosen rows at the point of the last :meth:`linearise`.

        ``v_nodes``: engine node indices of the voltage rows; ``branches``: branch
        conductor indices (``index`` order) of the current rows. Returns ``(v_pu (mv,),
        dv_dp (mv, n_points) [pu/kW], dv_dq [pu/kvar], i_a (mi,), di_dp [A/kW], di_dq
        [A/kvar])`` with the magnitudes at that point. Rows already computed since the
        last :meth:`linearise` are reused (an AC round adds a few rows to many).
        """
        if not hasattr(self, "_solver"):
            raise ModelError("call linearise(engine) first")
        vn = np.asarray(v_nodes, dtype=np.int64)
        bi = np.asarray(branches, dtype=np.int64)
        new_v = np.setdiff1d(vn, np.fromiter(self._cache_v, np.int64, len(self._cache_v)))
        new_i = np.setdiff1d(bi, np.fromiter(self._cache_i, np.int64, len(self._cache_i)))
        if new_v.size or new_i.size:
            out = self._adjoint(new_v, new_i)
            for k, r in enumerate(new_v):
                self._cache_v[int(r)] = (out[0][k], out[1][k], out[2][k])
            for k, r in enumerate(new_i):
                self._cache_i[int(r)] = (out[3][k], out[4][k], out[5][k])
        npt = self.n_points

        def stack(cache, idx):
            if idx.size == 0:
                return np.zeros(0), np.zeros((0, npt)), np.zeros((0, npt))
            got = [cache[int(r)] for r in idx]
            return (np.array([g[0] for g in got]), np.vstack([g[1] for g in got]),
                    np.vstack([g[2] for g in got]))

        return (*stack(self._cache_v, vn), *stack(self._cache_i, bi))

    def _adjoint(self, vn_e: np.ndarray, bi: np.ndarray) -> tuple[np.ndarray, ...]:
        v_y, base, solver = self._v_y, self._base, self._solver
        vn = self.y_of_e[vn_e]
        mv, mi = vn.size, bi.size
        rows, cols, vals = [], [], []
        to = self._ll_y[vn]
        ll = to >= 0
        vm = v_y[vn] - np.where(ll, v_y[np.maximum(to, 0)], 0.0)
        if mv:  # d|V| [pu] = (Re V dRe V + Im V dIm V) / (|V| base); on ungrounded areas
            # V = V_a - V_b and the base x sqrt(3) (derms.powerflow.voltage_measure)
            a = np.abs(vm) * base[vn] * np.where(ll, np.sqrt(3.0), 1.0)
            j = np.arange(mv)
            rows += [2 * vn, 2 * vn + 1, 2 * to[ll], 2 * to[ll] + 1]
            cols += [j, j, j[ll], j[ll]]
            vals += [vm.real / a, vm.imag / a, -vm.real[ll] / a[ll], -vm.imag[ll] / a[ll]]
        i0 = np.zeros(0)
        if mi:  # d|I| = Re(conj(I) / |I| M dV)
            m_sel = self.m_y[bi]
            cur = m_sel @ v_y
            i0 = np.abs(cur)
            with np.errstate(divide="ignore", invalid="ignore"):
                rot = np.where(i0 > 0, np.conj(cur) / i0, 0.0)
            ac = (sp.diags(rot) @ m_sel).tocoo()
            rows += [2 * ac.col, 2 * ac.col + 1]
            cols += [mv + ac.row, mv + ac.row]
            vals += [ac.data.real, -ac.data.imag]
        c = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(2 * self.n, mv + mi))
        h = adjoint_rows(solver, c, self._inj)  # (m, 2 n_points): P columns, then Q
        npt = self.n_points
        v_pu = np.abs(vm) / (base[vn] * np.where(ll, np.sqrt(3.0), 1.0))
        return (v_pu if mv else np.zeros(0), h[:mv, :npt], h[:mv, npt:], i0,
                h[mv:, :npt], h[mv:, npt:])


__all__ = ["RowSensitivities"]
