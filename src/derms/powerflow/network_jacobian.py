"""The sparse real Jacobian of KCL around a solved OpenDSS point, and its fast solver.

``network_jacobian`` stamps, for every node, ``Y_net V + I_elem(V) = I_src`` linearised as
a real ``2n x 2n`` matrix (network Y minus the loads' own Yprim, plus each load's
linearised current by its OpenDSS law and connection, :mod:`derms.powerflow.linear_loads`).
``LeafSolver`` factorises it (leaf buses by vectorised block elimination, the core by
SuperLU). Shared by the linearised model and the state estimator.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from derms.errors import ModelError
from derms.powerflow.linear_loads import branch_jacobian, branch_voltage
from derms.threads import blas_single_thread, solve_workers


class LeafSolver:
    """Solve ``J x = b`` for many right-hand sides at once.

    Buses that hang off the rest by a single neighbour (services, secondaries, lateral
    ends) are eliminated first, in rounds, by vectorised block Schur complements; the
    remaining core is factorised by SuperLU. Same arithmetic as a sparse LU, but the
    eliminated buses are recovered by one sparse x dense product per round over all
    right-hand sides, instead of SuperLU's column-by-column sweeps (≈ 3x faster on IEEE
    8500, whose secondaries are more than half its nodes). Rows and columns are kept in a
    permuted order: ``perm[p]`` is the original dimension at position ``p``, ``pos`` its
    inverse; dimensions of one bus stay together and in their original order.
    """

    def __init__(self, jac: sp.csr_matrix, bus_of_dim: np.ndarray, max_rounds: int = 6,
                 chains: bool = False) -> None:
        n, nb = jac.shape[0], int(bus_of_dim.max()) + 1
        if chains:  # the bus graph as an edge list, straight from the pattern
            rows = np.repeat(np.arange(n), np.diff(jac.indptr))
            bu, bv = bus_of_dim[rows], bus_of_dim[jac.indices]
            rnd = _chain_rounds_edges(np.r_[bu, bv], np.r_[bv, bu], nb, max_rounds)
        else:
            g = sp.csr_matrix((np.ones(n), (np.arange(n), bus_of_dim)), shape=(n, nb))
            pattern = sp.csr_matrix((np.ones(jac.nnz), jac.indices, jac.indptr),
                                    shape=jac.shape)
            adj = (g.T @ pattern @ g).tocsr()
            adj.setdiag(0)
            adj.eliminate_zeros()
            adj.data[:] = 1.0
            rnd = _leaf_rounds(adj, max_rounds)
        self.perm = perm = np.lexsort((np.arange(n), bus_of_dim, rnd[bus_of_dim]))
        self.pos = np.empty(n, dtype=np.int64)
        self.pos[perm] = np.arange(n)
        cur = jac[perm][:, perm].tocsr()
        bus_p = bus_of_dim[perm]
        edges = np.searchsorted(rnd[bus_p], np.arange(max_rounds + 1))
        self.rounds = []
        for a, b in zip(edges[:-1], edges[1:]):
            if b == a:
                continue
            inv = block_inverse(cur[: b - a, : b - a], bus_p[a:b])
            jsr, jrs = cur[: b - a, b - a :], cur[b - a :, : b - a]
            m_mat, f_mat = (inv @ jsr).tocsr(), (jrs @ inv).tocsr()
            f_rows = np.flatnonzero(np.diff(f_mat.indptr))
            self.rounds.append((a, b, inv.tocsr(), m_mat, f_rows + b, f_mat[f_rows]))
            cur = (cur[b - a :, b - a :] - jrs @ m_mat).tocsr()
        self.core = n - cur.shape[0]
        self._transposed = None  # solve_transposed's factors, built on first use
        try:
            self.lu = spla.splu(cur.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.1)
        except RuntimeError as exc:
            raise ModelError(f"network Jacobian is singular ({exc}); isolated nodes?") from None

    def solve(self, b: np.ndarray) -> np.ndarray:
        """Solve in place for ``b`` (2n x k, permuted order); returns ``b``."""
        for a, c, _, _, rows, f in self.rounds:
            b[rows] -= f @ b[a:c]
        core = b[self.core :]
        for lo in range(0, b.shape[1], 32):
            core[:, lo : lo + 32] = self.lu.solve(np.asfortranarray(core[:, lo : lo + 32]))
        for a, c, inv, m_mat, _, _ in reversed(self.rounds):
            b[a:c] = inv @ b[a:c] - m_mat @ b[c:]
        return b


    def solve_transposed(self, b: np.ndarray) -> np.ndarray:
        """Solve ``J^T x = b`` in place (``b``: 2n or 2n x k, permuted order); returns ``b``.

        The same factors taken in transposed order: forward through the rounds with each
        round's ``(A^-1 B)^T``, the core by SuperLU's transposed solve, back with
        ``A^-T`` and ``(C A^-1)^T``."""
        if self._transposed is None:  # the rounds' factors transposed (CSC views), once
            self._transposed = [(m_mat.T, inv.T, f.T)
                                for _, _, inv, m_mat, _, f in self.rounds]
        for (a, c, *_), (m_t, _, _) in zip(self.rounds, self._transposed):
            b[c:] -= m_t @ b[a:c]
        core = b[self.core :]
        core[...] = self.lu.solve(np.asfortranarray(core), trans="T")
        for (a, c, _, _, rows, _), (_, inv_t, f_t) in zip(reversed(self.rounds),
                                                          reversed(self._transposed)):
            b[a:c] = inv_t @ b[a:c] - f_t @ b[rows]
        return b


def _leaf_rounds(adj: sp.csr_matrix, max_rounds: int) -> np.ndarray:
    """Elimination round of each bus (``max_rounds`` = the core): leaves, in rounds, while a
    round removes at least 5 % of the buses left."""
    nb = adj.shape[0]
    rnd = np.full(nb, max_rounds)
    alive = np.ones(nb, dtype=bool)
    for r in range(max_rounds):
        leaf = alive & (adj @ alive == 1)
        leaf &= adj @ leaf == 0  # not two leaves facing each other
        if leaf.sum() < 0.05 * alive.sum():
            break
        rnd[leaf], alive = r, alive & ~leaf
    return rnd


def _chain_rounds(adj: sp.csr_matrix, max_rounds: int) -> np.ndarray:
    """Elimination round of each bus (``max_rounds`` = the core) when buses with one *or
    two* live neighbours are eliminated: a leaf, or a bus inside a chain (a line section),
    whose elimination joins its two neighbours (one fill edge). Each round takes an
    independent set of them (no two adjacent; leaves first, then by index), so a radial
    feeder shrinks geometrically (rake and compress) instead of by one bus per chain and
    round; it stops when a round removes less than 2 % of the buses left.

    On an edge list (both directions, self loops dropped), one round a few vectorised
    passes over the live edges (sparse matrix products per round took ≈ 25 ms on IEEE
    8500's 16 rounds)."""
    sym = (adj + adj.T).tocoo()  # the pattern is symmetric: make sure
    return _chain_rounds_edges(sym.row, sym.col, adj.shape[0], max_rounds)


def _chain_rounds_edges(u: np.ndarray, v: np.ndarray, nb: int, max_rounds: int
                        ) -> np.ndarray:
    """:func:`_chain_rounds` of the graph with edges ``(u, v)`` over ``nb`` buses (given in
    both directions; repeats and self loops are dropped)."""
    off = u != v
    u, v = _unique_edges(u[off].astype(np.int64), v[off].astype(np.int64), nb)
    rnd = np.full(nb, max_rounds)
    alive = np.ones(nb, dtype=bool)
    top = float(3 * nb + 1)
    idx = np.arange(nb)
    for r in range(max_rounds):
        deg = np.bincount(u, minlength=nb)  # live neighbours (only live edges are kept)
        cand = alive & (deg >= 1) & (deg <= 2)
        rank = np.where(cand, top - (deg * nb + idx), 0.0)  # larger = first
        best = np.zeros(nb)
        np.maximum.at(best, u, rank[v])
        pick = cand & (rank > best)
        if pick.sum() < 0.02 * alive.sum():
            break
        rnd[pick], alive = r, alive & ~pick
        # a picked bus with two neighbours joins them (picked buses are never adjacent)
        at = pick[u]
        pu, pv = u[at], v[at]
        order = np.argsort(pu, kind="stable")
        pu, pv = pu[order], pv[order]
        two = np.flatnonzero((pu[1:] == pu[:-1]))
        fa, fb = pv[two], pv[two + 1]
        keep = ~at & ~pick[v]
        u, v = _unique_edges(np.r_[u[keep], fa, fb], np.r_[v[keep], fb, fa], nb)
    return rnd


def _unique_edges(u: np.ndarray, v: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct directed edges ``(u, v)``, sorted by ``u`` then ``v``."""
    key = np.unique(u * nb + v)
    return key // nb, key % nb


def block_inverse(jss: sp.spmatrix, bus: np.ndarray) -> sp.csr_matrix:
    """Inverse of a block-diagonal matrix whose blocks are the runs of equal ``bus``
    (CSR, each block stored dense: its rows hold its columns in order). The blocks'
    local indices are found once, and the result is written straight into CSR arrays."""
    jss = jss.tocoo()
    n = bus.size
    start = np.flatnonzero(np.r_[True, bus[1:] != bus[:-1]])
    size = np.diff(np.r_[start, n])
    blk_of_row = np.repeat(np.arange(start.size), size)
    blk = blk_of_row[jss.row]
    loc_r, loc_c, blk_size = jss.row - start[blk], jss.col - start[blk], size[blk]
    row_len = size[blk_of_row]
    indptr = np.r_[0, np.cumsum(row_len)]
    indices = np.repeat(start[blk_of_row], row_len) + (
        np.arange(indptr[-1]) - np.repeat(indptr[:-1], row_len))
    data = np.empty(indptr[-1])
    for d in np.unique(size):
        sel = np.flatnonzero(size == d)
        slot = np.full(start.size, -1)
        slot[sel] = np.arange(sel.size)
        e = blk_size == d
        dense = np.zeros((sel.size, d, d))
        dense[slot[blk[e]], loc_r[e], loc_c[e]] = jss.data[e]
        try:
            inv = np.linalg.inv(dense)
        except np.linalg.LinAlgError:
            raise ModelError("network Jacobian is singular at a leaf bus") from None
        data[(indptr[start[sel]][:, None] + np.arange(d * d)).ravel()] = inv.ravel()
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


def system_y(engine, n: int) -> sp.csc_matrix:
    """The engine's system admittance matrix [S] (n x n complex, Y-node order)."""
    data, indices, indptr = engine.ctx.YMatrix.GetCompressedYMatrix(factor=False)
    return sp.csc_matrix((data, indices, indptr), shape=(n, n))


def network_jacobian(engine, v_y: np.ndarray, br, band_pu: float,
                     y: sp.csc_matrix | None = None) -> sp.csr_matrix:
    """Real 2n x 2n Jacobian of the current balance, rows/cols (Re V0, Im V0, Re V1, ...).

    ``y``: the engine's :func:`system_y`, read if None."""
    n = v_y.size
    y = system_y(engine, n) if y is None else y
    a, b = branch_jacobian(br, branch_voltage(v_y, br), band_pu)
    i, j = br.node_i, br.node_j
    ok_i, ok_j, ok = i >= 0, j >= 0, (i >= 0) & (j >= 0)
    rows = np.r_[i[ok_i], j[ok_j], i[ok], j[ok]]
    cols = np.r_[i[ok_i], j[ok_j], j[ok], i[ok]]

    def stamp(v):
        vals = np.r_[v[ok_i], v[ok_j], -v[ok], -v[ok]]
        return sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()

    ya, sb = (y + stamp(a)).tocsr(), stamp(b)
    rot = sp.csr_matrix(np.array([[0.0, -1.0], [1.0, 0.0]]))
    swap = sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))
    eye, flip = sp.identity(2, format="csr"), sp.diags([1.0, -1.0])
    return (
        sp.kron(ya.real, eye) + sp.kron(ya.imag, rot) + sp.kron(sb.real, flip)
        + sp.kron(sb.imag, swap)
    ).tocsr()


def complex_pairs(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[0::2] + 1j * arr[1::2]


SOLVE_BATCH = 256  # largest number of adjoint right-hand sides per leaf-solver pass
MIN_BATCH = 32


def adjoint_rows(solver: LeafSolver, c: sp.csc_matrix, e_mat: sp.csc_matrix,
                 workers: int | None = None) -> np.ndarray:
    """``(J^-T c)^T E`` for sparse functionals ``c`` (2n x m): one adjoint solve per column.

    Same arithmetic as ``LeafSolver.solve`` but the forward elimination of the leaf
    rounds runs on the *sparse* right-hand sides (a meter's functional touches one node
    and stays local until it reaches the core), and the back substitution produces only
    the rows ``E`` reads and the rows those depend on (:func:`_needed_rows`).
    Batches of columns run in ``workers`` threads (default
    :func:`~derms.threads.solve_workers`; ≈ 1.8x faster on IEEE 8500 with two); each batch
    writes its own rows of the result, so the result does not depend on the threads.
    """
    m = c.shape[1]
    c_p = c.tocsr()[solver.perm]
    e_p = e_mat.tocsr()[solver.perm].T.tocsr()  # (2k x 2n), columns in solver positions
    n2 = c.shape[0]
    h_mat = np.empty((m, e_mat.shape[1]))
    back = _needed_rows(solver, np.unique(e_p.indices))

    def one(lo: int, hi: int) -> None:
        b = c_p[:, lo:hi].tocsr()
        for a, cc, _, _, rows, f in solver.rounds:
            upd = (f @ b[a:cc]).tocsr()  # the rows `rows` (ascending) of the update
            ptr = np.zeros(n2 + 1, dtype=upd.indptr.dtype)
            ptr[rows + 1] = np.diff(upd.indptr)
            b = b - sp.csr_matrix((upd.data, upd.indices, np.cumsum(ptr)), shape=b.shape)
        y = b.toarray()
        y[solver.core:] = solver.lu.solve(b[solver.core:].toarray(order="F"))
        for a, cc, need, inv_n, m_n in reversed(back):
            out = inv_n @ y[a:cc]
            out -= m_n @ y[cc:]
            if need.size == cc - a:
                y[a:cc] = out
            else:
                y[need] = out
        h_mat[lo:hi] = (e_p @ y).T

    workers = solve_workers() if workers is None else max(1, int(workers))
    # four batches per worker balance the threads; none above SOLVE_BATCH (memory)
    size = int(np.clip(-(-m // (4 * workers)), MIN_BATCH, SOLVE_BATCH))
    spans = [(lo, min(lo + size, m)) for lo in range(0, m, size)]
    if workers == 1 or len(spans) == 1:
        for lo, hi in spans:
            one(lo, hi)
    else:  # BLAS threads on top of these would oversubscribe the cores
        with blas_single_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(one, lo, hi) for lo, hi in spans]:
                fut.result()
    return h_mat


def _needed_rows(solver: LeafSolver, rows_read: np.ndarray) -> list[tuple]:
    """Per round (solver order): ``(a, c, need, inv[need], m_mat[need])``, ``need`` the
    positions (in ``a:c``) whose solution the back substitution must produce for the
    rows ``rows_read`` (solver positions): those read themselves, and the positions the
    needed rows of every outer round read through their ``A^-1 B`` (IEEE 8500, E's rows:
    13,170 of 17,056, a fifth less work)."""
    needed = np.zeros(solver.perm.size, dtype=bool)
    needed[rows_read] = True
    back = []
    for a, cc, inv, m_mat, _, _ in solver.rounds:
        loc = np.flatnonzero(needed[a:cc])
        m_n = m_mat[loc]
        needed[m_n.indices + cc] = True
        back.append((a, cc, loc + a, inv[loc], m_n))
    return back


def y_bases_v(engine, y_of_e: np.ndarray, n: int | None = None) -> np.ndarray:
    """Voltage base [V] of every node in Y order, its bus's kVBase (``y_of_e``: the Y index
    of each engine node; ``n``: number of Y nodes, default ``y_of_e.size``)."""
    ckt = engine.circuit
    vmag = np.asarray(ckt.AllBusVmag, dtype=float)
    vpu = np.asarray(ckt.AllBusVmagPu, dtype=float)
    base = np.ones(y_of_e.size if n is None else n)
    with np.errstate(divide="ignore", invalid="ignore"):
        base[y_of_e] = np.where(vpu > 0, vmag / vpu, 1.0)
    return base
