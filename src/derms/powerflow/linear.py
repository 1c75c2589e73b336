"""Linearised three-phase model: sensitivities of node voltage magnitudes to P and Q.

Approach
--------
Around a solved OpenDSS operating point ``V0`` the network satisfies KCL
``Y_net V + I_elem(V) = I_src``. ``Y_net`` is OpenDSS's system Y (lines, transformers at
their present taps, capacitors, the Vsource's Thevenin admittance) *minus* the nominal
admittance ``Yeq`` that OpenDSS stamps into Y for every load, generator, PV system and
storage (it compensates those with injection currents). ``I_elem`` are the true,
voltage-dependent element currents: every load phase branch (wye to neutral or ground,
delta or line-to-line across two nodes) follows its OpenDSS model and voltage region
(:mod:`derms.powerflow.linear_loads`), linearised as ``dI = A dV + B conj(dV)``. The
``conj`` term makes the Jacobian real-linear only, so it is assembled as one sparse real
``2n x 2n`` matrix (node-interleaved real/imaginary parts), factorised once with
``scipy.sparse.linalg.splu``, and solved for the right-hand sides of the chosen nodes only
(batched matrix RHS). No nodes x nodes matrix is ever formed.

A power change ``dS`` at node ``k`` (wye, node to ground) adds the current
``conj(dS / V0_k)``. Magnitudes follow ``d|V| = Re(conj(V0) dV) / |V0|``, in pu of each
bus's base (OpenDSS ``kVBase``, as ``AllBusVmagPu``).

Sign convention (DESIGN): powers are *net import* at the node, consumption positive; a DER
generating 5 kW at unity power factor is ``p_kw = -5``.

Limits
------
* First-order Taylor model: the error grows with the square of the change; a load that
  crosses a region limit (``Vminpu``, ``Vmaxpu``) changes law and is not followed.
* Regulator taps and capacitor states are those of the operating point (as with
  ``set controlmode=off``); generators, PV systems and storage are constant power.
* Injections at 1-phase 120/240 V secondary nodes are node-to-ground (e.g. ``sx.1``),
  like every other injection here.
* The Vsource is kept as OpenDSS has it: a Norton equivalent (its admittance in Y, its
  current fixed), so source-bus voltages move slightly with the injections.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from derms.errors import ConvergenceError, InputError, ModelError
from derms.powerflow.linear_loads import branch_jacobian, branch_voltage, read_branches

log = logging.getLogger(__name__)

_BATCH_COLS = 512  # right-hand sides per triangular solve (bounds temporary memory)
_AC_PREFIX = "dlin__"


@dataclass(frozen=True, slots=True)
class LinearModel:
    """Voltage-magnitude sensitivities of every node to P and Q at chosen nodes.

    Attributes
    ----------
    node_names : list of str
        All nodes "bus.node", in the engine's node order (rows of the blocks).
    v0_pu : ndarray, (n_nodes,)
        Voltage magnitudes at the operating point [pu of each bus's base].
    injection_nodes : list of str
        Nodes whose power may change (columns of the blocks).
    dv_dp_pu_per_kw, dv_dq_pu_per_kvar : ndarray, (n_nodes, n_inj)
        ``d|V| / dp`` [pu/kW] and ``d|V| / dq`` [pu/kvar], with ``p``, ``q`` the *net
        import* (consumption positive) of a wye, node-to-ground element at the column node.
    """

    node_names: list[str]
    v0_pu: np.ndarray
    injection_nodes: list[str]
    dv_dp_pu_per_kw: np.ndarray
    dv_dq_pu_per_kvar: np.ndarray

    def predict_v_pu(self, p_kw: np.ndarray, q_kvar: np.ndarray) -> np.ndarray:
        """Node voltage magnitudes [pu] after power changes at the injection nodes.

        Parameters
        ----------
        p_kw, q_kvar : array_like, (n_inj,) or (n_inj, n_scenarios)
            Change of net import at each injection node [kW], [kvar], consumption
            positive (generation negative), in ``injection_nodes`` order.

        Returns
        -------
        ndarray, (n_nodes,) or (n_nodes, n_scenarios)
        """
        p = np.asarray(p_kw, dtype=float)
        q = np.asarray(q_kvar, dtype=float)
        n_inj = len(self.injection_nodes)
        if p.shape != q.shape or p.shape[:1] != (n_inj,) or p.ndim > 2:
            raise InputError(
                f"p_kw {p.shape} and q_kvar {q.shape} must both be ({n_inj},) or ({n_inj}, k)"
            )
        dv = self.dv_dp_pu_per_kw @ p + self.dv_dq_pu_per_kvar @ q
        return (self.v0_pu[:, None] + dv) if p.ndim == 2 else self.v0_pu + dv


def build_linear_model(engine, injection_nodes: Sequence[str] | None = None) -> LinearModel:
    """Linearise a solved engine around its operating point.

    Parameters
    ----------
    engine : OpenDSSEngine
        Compiled and solved (snapshot) engine; it is only read, never re-solved.
    injection_nodes : sequence of str, optional
        Nodes "bus.node" (case-insensitive) where power may change. ``None`` = every node
        a load is connected to (phase and neutral nodes other than ground).

    Returns
    -------
    LinearModel

    Raises
    ------
    ModelError
        An unknown node name (named in the message), or an engine that is not solved.
    """
    ckt = engine.circuit
    if not ckt.Solution.Converged:
        raise ConvergenceError("build_linear_model needs a solved engine (solve it first)")
    names_y = [s.lower() for s in ckt.YNodeOrder]
    names = engine.node_names()
    pos_y = {s: k for k, s in enumerate(names_y)}
    y_of_out = np.fromiter((pos_y[s] for s in names), dtype=np.int64, count=len(names))
    v_y = _complex(ckt.YNodeVarray)
    n = v_y.size

    br = read_branches(engine, v_y)
    if injection_nodes is None:
        nodes_y = np.unique(np.r_[br.node_i, br.node_j])
        out_of_y = np.empty(n, dtype=np.int64)
        out_of_y[y_of_out] = np.arange(n)
        inj_out = np.sort(out_of_y[nodes_y[nodes_y >= 0]])
        inj_names = [names[k] for k in inj_out]
    else:
        inj_names = [str(s).strip().lower() for s in injection_nodes]
        unknown = [s for s in inj_names if s not in pos_y]
        if unknown:
            more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
            raise ModelError(f"unknown node {unknown[0]!r}{more} (expected 'bus.node')")
        if len(set(inj_names)) != len(inj_names):
            raise InputError("injection_nodes has duplicates")
    inj_y = np.fromiter((pos_y[s] for s in inj_names), dtype=np.int64, count=len(inj_names))

    jac = _jacobian(engine, v_y, br)
    try:
        lu = spla.splu(jac.tocsc())
    except RuntimeError as exc:  # singular: isolated nodes or a floating subnetwork
        raise ModelError(f"network Jacobian is singular ({exc}); isolated nodes?") from None

    base_v = _node_bases_v(engine)[np.argsort(y_of_out)]  # in Y order
    v0_pu_y = np.abs(v_y) / base_v
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = np.where(np.abs(v_y) > 0, np.conj(v_y) / (np.abs(v_y) * base_v), 0)
    dvp = np.empty((n, inj_y.size))
    dvq = np.empty((n, inj_y.size))
    # RHS: import dS at node k injects -conj(dS / V0_k); 1 kW = 1000 W.
    cur_p = -1000.0 / np.conj(v_y[inj_y])
    cur_q = 1000.0j / np.conj(v_y[inj_y])
    for lo in range(0, inj_y.size, _BATCH_COLS // 2):
        cols = slice(lo, min(lo + _BATCH_COLS // 2, inj_y.size))
        k = inj_y[cols]
        m = k.size
        rhs = np.zeros((2 * n, 2 * m), order="F")
        c = np.arange(m)
        rhs[2 * k, c], rhs[2 * k + 1, c] = cur_p[cols].real, cur_p[cols].imag
        rhs[2 * k, m + c], rhs[2 * k + 1, m + c] = cur_q[cols].real, cur_q[cols].imag
        x = lu.solve(rhs)
        sens = proj.real[:, None] * x[0::2] - proj.imag[:, None] * x[1::2]
        dvp[:, cols] = sens[y_of_out, :m]
        dvq[:, cols] = sens[y_of_out, m:]
    return LinearModel(names, v0_pu_y[y_of_out], inj_names, dvp, dvq)


def _jacobian(engine, v_y: np.ndarray, br) -> sp.csr_matrix:
    """Real 2n x 2n Jacobian of the current balance, rows/cols (Re V0, Im V0, Re V1, ...)."""
    data, indices, indptr = engine.ctx.YMatrix.GetCompressedYMatrix(factor=False)
    n = v_y.size
    y = sp.csc_matrix((data, indices, indptr), shape=(n, n))
    a, b = branch_jacobian(br, branch_voltage(v_y, br))
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


def _complex(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[0::2] + 1j * arr[1::2]


def _node_bases_v(engine) -> np.ndarray:
    """Voltage base [V] of every node (its bus's kVBase), in engine node order."""
    ckt = engine.circuit
    vmag = np.asarray(ckt.AllBusVmag, dtype=float)
    vpu = np.asarray(ckt.AllBusVmagPu, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        base = np.where(vpu > 0, vmag / vpu, np.nan)
    if np.isnan(base).any():  # dead nodes: ask their bus
        names = engine.node_names()
        for k in np.flatnonzero(np.isnan(base)):
            ckt.SetActiveBus(names[k].rsplit(".", 1)[0])
            base[k] = 1000.0 * ckt.ActiveBus.kVBase or 1.0
    return base


def solve_ac_with_injections(
    engine, nodes: Sequence[str], p_kw: np.ndarray, q_kvar: np.ndarray
) -> np.ndarray:
    """Full AC check: add constant-power changes at nodes, solve, return |V| [pu].

    Each node gets a 1-phase wye load (node to ground) named ``dlin__<bus>__<node>``,
    constant PQ over the whole voltage range (``vlowpu=0 vminpu=0 vmaxpu=1000``,
    ``status=fixed`` so load multipliers do not scale it). The loads are disabled again
    after the solve; the engine keeps the perturbed solution. Controls are whatever the
    engine's control mode says (use ``set_control_mode("off")`` to freeze them).

    Parameters
    ----------
    engine : OpenDSSEngine
    nodes : sequence of str
        "bus.node" names.
    p_kw, q_kvar : array_like, (n_nodes_given,)
        Net import added at each node [kW], [kvar], consumption positive.

    Returns
    -------
    ndarray, (n_nodes,)
        Voltage magnitudes [pu] of all nodes in the engine's node order.
    """
    ckt = engine.circuit
    known = set(engine.node_names())
    loads, el = ckt.Loads, ckt.ActiveCktElement
    names = []
    for node in nodes:
        node = str(node).lower()
        if node not in known:
            raise ModelError(f"unknown node {node!r} (expected 'bus.node')")
        bus, phase = node.rsplit(".", 1)
        name = f"{_AC_PREFIX}{bus}__{phase}"
        if ckt.SetActiveElement(f"Load.{name}") < 0:
            ckt.SetActiveBus(bus)
            kv = ckt.ActiveBus.kVBase or 1.0
            engine.command(
                f"New Load.{name} bus1={node} phases=1 conn=wye kV={kv} kW=0 kvar=0 "
                "model=1 vlowpu=0 vminpu=0 vmaxpu=1000 status=fixed"
            )
        names.append(name)
    p = np.asarray(p_kw, dtype=float)
    q = np.asarray(q_kvar, dtype=float)
    for name, pk, qk in zip(names, p, q, strict=True):
        loads.Name = name
        el.Enabled = True
        loads.kW = float(pk)
        loads.kvar = float(qk)
    try:
        engine.solve()
        return engine.node_voltages_pu()
    finally:
        for name in names:
            loads.Name = name
            el.Enabled = False
