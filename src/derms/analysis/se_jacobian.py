"""The measurement Jacobian of the state estimator, by adjoint solves of the network Jacobian.

Rows: measured node-voltage magnitudes [pu] and head P/Q per phase; columns: the estimated
load injections. ``H = C^T J^-1 E``: the measurement functionals ``C`` are solved against the
transposed network Jacobian (one adjoint solve per measurement, batched), then multiplied by
the sparse load-injection matrix ``E``; no nodes x nodes matrix is formed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

from derms.errors import ModelError
from derms.powerflow.linear_loads import branch_power, branch_voltage, read_branches
from derms.powerflow.network_jacobian import (
    LeafSolver,
    adjoint_rows,
    complex_pairs,
    network_jacobian,
    system_y,
    y_bases_v,
)
from derms.powerflow.voltage_measure import partners_in


def activate_source(ckt) -> None:
    """Make the circuit's first Vsource (the feeder head) the active element."""
    vs = ckt.Vsources
    if not vs.First:
        raise ModelError("the circuit has no Vsource: no feeder head")
    ckt.SetActiveElement(f"vsource.{vs.Name}")




def measurement_jacobian(engine, v_y, y_names, y_of_e, mv_y, lnames, x, n_ph: int,
                         br=None, parts: dict | None = None) -> np.ndarray:
    """H (m_meas x 2 n_loads): d(meters, head P, head Q) / d(load kW, load kvar).

    ``br``: the engine's load branches at ``v_y`` (:func:`read_branches`), read if None.
    ``parts``: if given, filled with what H was built from (``solver``: the transposed
    KCL Jacobian's :class:`LeafSolver`, ``e_mat``: the load injections, ``v_y``: the
    operating point), for rows of other quantities at the same point
    (:mod:`derms.analysis.se_posterior`).

    H depends only on the operating point and the meters, so it is kept on the engine
    (``engine.derived``, up to ``CACHE_MAX_BYTES``) and reused when (a) a digest of
    what fixes it is unchanged: the system Y matrix (topology, taps, capacitors, line
    data), the states ``x``, the load laws, the node voltage bases, the meter nodes and
    their line-to-line partners and the head phases (solved powers of generators, PV
    and storage rounded to 3 significant digits and 10 W/var: the solve tolerance leaves
    their last digits to the starting point), and (b) the operating point it was built
    at is within ``CACHE_V_TOL_PU`` of ``v_y`` at every node (what the digest cannot
    see: the source's voltage, current sources). An estimate from the same prior point
    (a monitoring cycle between profile steps, or snapshots estimated against one
    profile) reuses it; anything else rebuilds it. The array returned is read-only.
    """
    br = read_branches(engine, v_y) if br is None else br
    n = len(y_names)
    y_sys = system_y(engine, n)
    to = partners_in(engine.voltage_pairs(), y_of_e, n)[mv_y]
    base = y_bases_v(engine, y_of_e)
    key = _digest(y_sys.data, y_sys.indices, y_sys.indptr, mv_y, to, x,
                  _round_power(base, digits=6, floor=0.0),  # |V| / pu: last digits vary
                  np.asarray([n_ph, n, engine.circuit.Solution.LoadMult]),
                  np.asarray(lnames, dtype=str), np.asarray(br.element, dtype=str),
                  br.node_i, br.node_j, br.y_sys_s, br.model, br.v_base_v, br.vlow_pu,
                  br.vmin_pu, br.vmax_pu, br.cvr_p, br.cvr_q, br.zipv,
                  _round_power(br.w_nom_w), _round_power(br.var_nom_var),
                  _round_power(br.var_fixed_var))
    cached = engine.derived.get(JACOBIAN_KEY)
    if (cached is not None and cached[0] == key
            and np.max(np.abs(cached[2] - v_y) / base, initial=0.0) <= CACHE_V_TOL_PU):
        if parts is not None:
            parts.update(cached[3])
        return cached[1]
    jac = network_jacobian(engine, v_y, br, 0.0, y=y_sys)
    bus = np.unique([s.rsplit(".", 1)[0] for s in y_names], return_inverse=True)[1]
    # leaves and line sections eliminated in rounds: IEEE 8500 down to its head bus in
    # 16 rounds, no core left for SuperLU (adjoint solves 0.23 -> 0.14 s)
    solver = LeafSolver(jac.T.tocsr(), np.repeat(bus, 2), max_rounds=64, chains=True)

    # functionals c (2n x m) over (Re dV, Im dV) in Y order: d|V| / (base |V|) per meter,
    # or on ungrounded areas d|V_a - V_b| / (sqrt(3) base) (what such a meter reads)
    j = np.arange(mv_y.size)
    has = to >= 0
    vd = v_y[mv_y] - np.where(has, v_y[np.maximum(to, 0)], 0.0)
    a = np.abs(vd) * base[mv_y] * np.where(has, np.sqrt(3.0), 1.0)
    jl = j[has]
    rows = np.r_[2 * mv_y, 2 * mv_y + 1, 2 * to[has], 2 * to[has] + 1]
    cols = np.r_[j, j, jl, jl]
    vals = np.r_[vd.real / a, vd.imag / a, -vd.real[has] / a[has], -vd.imag[has] / a[has]]
    c = sp.coo_matrix((vals, (rows, cols)), shape=(2 * n, mv_y.size)).tocsc()
    if n_ph:
        c = sp.hstack([c, sp.csc_matrix(_head_functionals(engine, v_y, n, n_ph))]).tocsc()
    e_mat = _load_injections(br, v_y, lnames, x, n)
    h_mat = adjoint_rows(solver, c, e_mat)
    h_mat.flags.writeable = False
    built = {"solver": solver, "e_mat": e_mat, "v_y": v_y.copy()}
    if parts is not None:
        parts.update(built)
    engine.derived.pop(JACOBIAN_KEY, None)
    if h_mat.nbytes <= CACHE_MAX_BYTES:
        engine.derived[JACOBIAN_KEY] = (key, h_mat, built["v_y"], built)
    return h_mat


JACOBIAN_KEY = "se_measurement_jacobian"
CACHE_V_TOL_PU = 1e-4  # the engine's default solve tolerance
CACHE_MAX_BYTES = 200e6  # H larger than this (a meter at every load of ckt24) is not kept


def _round_power(a: np.ndarray, digits: int = 3, floor: float = 10.0) -> np.ndarray:
    """Powers [W], [var] rounded to ``digits`` significant digits, those below ``floor``
    in magnitude to 0 (solver noise on a unity power factor's var)."""
    a = np.where(np.abs(np.asarray(a, dtype=float)) < floor, 0.0, a)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log10(np.abs(a)))
    q = 10.0 ** (np.where(np.isfinite(e), e, 0.0) - digits + 1)
    return np.round(a / q) * q


def _digest(*arrays: np.ndarray) -> bytes:
    """A digest of the arrays' shapes, types and bytes (the cache key)."""
    h = hashlib.blake2b(digest_size=32)
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
    return h.digest()


def _head_functionals(engine, v_y, n: int, n_ph: int) -> np.ndarray:
    """Rows of d(head P [kW]), d(head Q [kvar]) per phase over (Re dV, Im dV), as columns.

    The Vsource is a Norton equivalent: its terminal current is ``I = Yprim V - I_inj``
    with a constant ``I_inj``, so ``dS_p = conj(I_p) dV_p + V_p sum_q conj(Y_pq) conj(dV_q)``;
    the head power is ``-S`` (power delivered into the feeder).
    """
    ckt = engine.circuit
    activate_source(ckt)
    el = ckt.ActiveCktElement
    ncond = int(el.NumConductors) * int(el.NumTerminals)
    refs = np.asarray(el.NodeRef, dtype=int) - 1
    yp = np.asarray(el.Yprim, dtype=float)
    ymat = (yp[0::2] + 1j * yp[1::2]).reshape(ncond, ncond)
    cur = complex_pairs(el.Currents)
    out = np.zeros((2 * n, 2 * n_ph))
    for p in range(n_ph):
        if refs[p] < 0:
            continue
        a = np.zeros(n, complex)
        b = np.zeros(n, complex)
        a[refs[p]] += np.conj(cur[p])
        live = refs >= 0
        np.add.at(b, refs[live], v_y[refs[p]] * np.conj(ymat[p, live]))
        a, b = -a / 1000.0, -b / 1000.0
        # Re f: x (ar + br), y (bi - ai); Im f: x (ai + bi), y (ar - br)
        out[0::2, p] = a.real + b.real
        out[1::2, p] = b.imag - a.imag
        out[0::2, n_ph + p] = a.imag + b.imag
        out[1::2, n_ph + p] = a.real - b.real
    return out


def _load_injections(br, v_y, lnames, x: np.ndarray, n: int) -> sp.csc_matrix:
    """E (2n x 2 n_loads): injected current (Re, Im per Y node) per kW and per kvar.

    A branch from node i to node j drawing ``dS`` injects ``-conj(dS / Vd)`` at i and
    ``+conj(dS / Vd)`` at j (``Vd = V_i - V_j``). Every OpenDSS load law is proportional to
    the kW (and kvar) property, so ``dS/dkW`` of a branch is its solved P / kW (its law at
    the present voltage, ``LoadMult`` included); 1000 W / phases where kW is 0. A load on a
    de-energised node (``Vd = 0``) injects nothing.
    """
    k = lnames.size
    col = {f"load.{s}": c for c, s in enumerate(lnames)}
    sel = np.fromiter((col.get(e, -1) for e in br.element), dtype=np.int64,
                      count=br.element.size)
    keep = sel >= 0
    vd_all = branch_voltage(v_y, br)
    s_b = branch_power(br, np.abs(vd_all))[0][keep]  # every branch's law, then the kept ones
    vd = vd_all[keep]
    li = sel[keep]
    nb = np.bincount(li, minlength=k)[li]
    kw, kvar = x[:k][li], x[k:][li]
    with np.errstate(divide="ignore", invalid="ignore"):
        dsp = np.where(np.abs(kw) > 1e-9, s_b.real / kw, 1000.0 / nb)
        dsq = 1j * np.where(np.abs(kvar) > 1e-9, s_b.imag / kvar, 1000.0 / nb)
    ni, nj = br.node_i[keep], br.node_j[keep]
    live = np.abs(vd) > 0  # a load on a de-energised part draws nothing: no column entry
    # (dS / 0 was NaN, and the NaN loads written into the engine broke every later solve)
    vd_safe = np.where(live, vd, 1.0)
    rows, cols, vals = [], [], []
    for ds, off in ((dsp, 0), (dsq, k)):
        inj = np.where(live, -np.conj(ds / vd_safe), 0.0)
        for node, sign in ((ni, 1.0), (nj, -1.0)):
            ok = node >= 0
            rows += [2 * node[ok], 2 * node[ok] + 1]
            cols += [li[ok] + off, li[ok] + off]
            vals += [sign * inj[ok].real, sign * inj[ok].imag]
    return sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(2 * n, 2 * k)).tocsc()


# -- engine load access --------------------------------------------------------------------
def read_loads(loads, idx: np.ndarray) -> np.ndarray:
    """(kW..., kvar...) properties of the loads at 1-based ``idx`` (consumption positive)."""
    p, q = np.empty(idx.size), np.empty(idx.size)
    for j, i in enumerate(idx):
        loads.idx = int(i)
        p[j], q[j] = loads.kW, loads.kvar
    return np.r_[p, q]


def write_loads(loads, idx: np.ndarray, x: np.ndarray) -> None:
    """Set the loads' kW, then kvar (setting kW re-derives kvar from the pf)."""
    k = idx.size
    for j, i in enumerate(idx):
        loads.idx = int(i)
        loads.kW = float(x[j])
        loads.kvar = float(x[k + j])


def drawn_factor(br, v_y, lnames, x_lin: np.ndarray, cols: np.ndarray, mult: float
                 ) -> np.ndarray:
    """Drawn power / property of the state columns ``cols``, at node voltages ``v_y``.

    Column ``c < k`` is load ``c``'s P (drawn kW / ``kW`` property), ``c >= k`` its Q:
    ``LoadMult`` x the load's voltage law (exactly ``LoadMult`` for a constant-PQ load
    within its voltage limits). ``br`` holds the laws calibrated at loads ``x_lin``; every
    law is proportional to the property, so the factor does not depend on it. Vectorised
    over the branches; ``mult`` (``LoadMult``) where a property is 0 or the load has no
    branch (disabled).
    """
    k = lnames.size
    col = {f"load.{s}": c for c, s in enumerate(lnames)}
    sel = np.fromiter((col.get(e, -1) for e in br.element), dtype=np.int64,
                      count=br.element.size)
    keep = sel >= 0
    s_b = branch_power(br, np.abs(branch_voltage(v_y, br)))[0][keep]
    s_load = np.zeros(k, complex)
    np.add.at(s_load, sel[keep], s_b)
    drawn = np.r_[s_load.real, s_load.imag] / 1000.0  # kW, kvar at x_lin
    has = np.tile(np.bincount(sel[keep], minlength=k) > 0, 2)
    xl = x_lin[cols]
    ok = has[cols] & (np.abs(xl) > 1e-9)
    return np.where(ok, drawn[cols] / np.where(ok, xl, 1.0), mult)
