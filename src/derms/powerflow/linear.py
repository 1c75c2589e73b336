"""Linearised three-phase model: sensitivities of node voltage magnitudes to P and Q.

Approach
--------
Around a solved OpenDSS operating point ``V0`` KCL reads ``Y_net V + I_elem(V) = I_src``.
``Y_net`` is OpenDSS's system Y (lines, transformers at their present taps, capacitors,
the Vsource's Thevenin admittance) *minus* the nominal admittance ``Yeq`` OpenDSS stamps
into Y for every load, generator, PV system and storage (its solver compensates it with
injection currents; we subtract exactly the element's own ``Yprim`` entries). ``I_elem``
are the element currents, per phase branch (wye to neutral or ground, delta or
line-to-line across two nodes), following each load's OpenDSS model and voltage region
(:mod:`derms.powerflow.linear_loads`), linearised as ``dI = A dV + B conj(dV)``. The
``conj`` term makes the Jacobian real-linear only, so it is one sparse real ``2n x 2n``
matrix, factorised once (leaf buses by vectorised block elimination, the rest by
``scipy.sparse.linalg.splu``, see :class:`~derms.powerflow.network_jacobian.LeafSolver`) and solved only for the chosen
nodes' right-hand sides, as batched matrix RHS. No nodes x nodes matrix is formed.

A power change ``dS`` at node ``k`` (wye, node to ground) adds the current
``conj(dS / V0_k)``; one between two nodes (an injection named ``"bus.a.b"``, a delta or
line-to-line element) draws ``conj(dS / (V0_a - V0_b))`` from ``a`` into ``b`` and puts
no current into ground (on an ungrounded delta feeder a node-to-ground injection has no
return path but the lines' capacitance: its sensitivities are meaningless, IEEE 37 gives
12 pu/200 kW where the delta element moves the voltages by 0.01 pu); ``d|V| = Re(conj(V0) dV) / |V0|``, in pu of each bus's base
(OpenDSS ``kVBase``, as ``AllBusVmagPu``). Powers are *net import* at the node (DESIGN
sign convention): consumption positive, a DER generating 5 kW is ``p_kw = -5``.

Two choices reduce the error against the full AC solve (measured in
``bench/bench_linear.py``):

* The model is linear in ``u = (|V|^2 - |V0|^2) / (2 |V0|)`` [pu], whose derivatives are
  the blocks ``dv_dp``/``dv_dq`` (= ``d|V|/dp`` at ``V0``); :meth:`LinearModel.predict_v_pu`
  returns ``sqrt(|V0|^2 + 2 |V0| u)``. Squared magnitudes are more nearly linear in the
  powers (as in LinDistFlow): 25-30 % less error than ``|V0| + u`` while changes stay
  below ≈ 0.1 pu (worse beyond). An optimiser keeps the same linear rows and takes
  :meth:`LinearModel.u_limit_pu` as the bound. Other readouts of the same ``u`` were
  measured (:func:`~derms.powerflow.linear_check.readout_v_pu`, linear in
  ``(|V|^k - 1) / k``, ``log |V|`` at ``k = 0``; ``bench_linear.py --k``): ``k < 2``
  (``|V|``, ``log |V|``, ``1/|V|`` as for constant-power currents) is worse on every feeder
  and kind (IEEE 8500 mixed 0.027 / 0.034 / 0.040 pu at k = 1 / 0 / -1); ``k = 3-4`` lowers
  the mixed errors (IEEE 8500 0.0153-0.0156, IEEE 123 ≤ 0.0016) but collapses on large drops
  (IEEE 8500 same-sign 0.75-0.84 pu). ``k = 2`` stays the default.
* ``load_band_pu`` (default 0.05): each load's ``dS/d|V|`` is the central secant over
  ``±5 %`` of its voltage, not the tangent. This is the tangent for constant PQ, Z and I
  laws; it differs only within 5 % of ``Vminpu``/``Vmaxpu``, where OpenDSS switches a load
  to constant Z (IEEE 123 has loads at 1.047 pu with ``Vmaxpu`` 1.05). ``0`` = exact
  Jacobian (finite-difference checked to 3e-4 of the change for every load model).

Limits
------
* First order: the error grows with the square of the change. Measured (40 draws, 10 %
  of the nodes, totals up to ±50 % of the load; bench/README.md): IEEE 123 0.0048 pu if
  all injections share a sign, 0.0020 pu with mixed signs; IEEE 8500 mixed 0.0201 pu
  (38 of 40 draws ≤ 0.01; 0.0024 at ±10 %), same-sign 0.20 pu.
* That is the curvature of the AC solution, not a defect of these sensitivities. The
  mixed outliers on IEEE 8500 are draws whose random signs load one phase more than the
  others (seed 16: net total -5 kW, yet ≈ 1,800 phase-A node-phases fall by 0.08-0.15 pu
  while B and C rise by up to 0.08 pu, taps frozen); every constant-power element in that
  region (the feeder's loads and the injections, whose currents grow as ``1/|V|``) adds a
  second-order drop of ≈ 0.02 pu. With the injections replaced by fixed currents the error
  is still 0.012 pu (the loads' share).
  The AC reference is what DESIGN.md defines (the added elements draw their power exactly,
  to 1e-8, at any voltage; the feeder's loads switching law at ``Vminpu`` 0.88 makes the
  error smaller, not larger). Any model linear in ``|V|^2`` and exact at zero injection
  predicts ``|V(s)|^2 + |V(-s)|^2 = 2 |V0|^2`` for a draw and its mirror, so one of the two
  is off by at least the AC curvature
  (:func:`~derms.powerflow.linear_check.mirror_bound`): IEEE 8500 mixed 0.0205 pu
  (3 of 40 draws above 0.01), same-sign up to 0.039 pu (36 of 40). The 0.01 pu target
  cannot be met by any such model; on the draw with the largest bound (seed 16) this one
  is within 1.14 x of it. Other secants trade the draw for its mirror (``load_band_pu`` 0 / 0.1:
  0.0105 / 0.050 on one draw, 0.030 / 0.011 on its mirror). Nor by a model linear in
  ``|V|^k`` or ``log |V|`` (``mirror_bound(..., k)``): the IEEE 8500 mixed floor is 0.0434 /
  0.0357 / 0.0278 / 0.0205 / 0.0189 / 0.0174 pu at k = -1 / 0 / 1 / 2 / 3 / 4, least
  ≈ 0.0166 near k = 4.5, and rises again beyond (0.0207 at k = 6).
* A load crossing ``Vminpu``/``Vmaxpu`` changes law; taps and capacitor states are frozen
  at the operating point (``set controlmode=off``); generators, PV and storage are
  constant power at their solved output (their own Vmin/Vmax switching is ignored).
* Injections are node to ground, also at 120/240 V secondaries (``sx.1``, ``sx.2``). On
  an ungrounded island (e.g. IEEE 123 bus 610 behind a delta-delta transformer) that is
  ill-posed; such injection nodes are logged as ``floating_nodes``.
* The Vsource stays a Norton equivalent as in OpenDSS (source-bus voltages move a little).
* Branch-current sensitivities (``branches=True``) are first order in ``|I|``: a branch
  whose current passes through zero (reverses) is not linear in ``|I|`` there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from derms.errors import ConvergenceError, InputError, ModelError
from derms.powerflow.linear_branches import branch_current_matrix
from derms.powerflow.linear_loads import read_branches
from derms.powerflow.network_jacobian import LeafSolver, complex_pairs, network_jacobian
from derms.powerflow.voltage_measure import term_nodes

log = logging.getLogger(__name__)

_BATCH_NODES = 128  # injection nodes per solve: 2 x 128 RHS columns (≈ 35 MB on IEEE 8500)
_AC_PREFIX = "dlin__"
_FLOATING_PU_PER_KW = 1.0  # own-node sensitivity that betrays an ungrounded island


@dataclass(frozen=True, slots=True)
class BranchSensitivities:
    """Current-magnitude sensitivities of branch conductors (terminal 1, per phase).

    Rows follow :class:`derms.powerflow.collect.NetworkIndex` (``element``, ``phase``);
    ``i0_a`` is the operating-point current [A]; ``di_dp_a_per_kw`` / ``di_dq_a_per_kvar``
    (n_conductors, n_inj) are ``d|I| / dp`` [A/kW] and ``d|I| / dq`` [A/kvar] for the
    same net-import powers as the voltage blocks.
    """

    element: np.ndarray
    phase: np.ndarray
    i0_a: np.ndarray
    di_dp_a_per_kw: np.ndarray
    di_dq_a_per_kvar: np.ndarray
    # reactive power into terminal 1 of the conductors ``flow_rows`` (rows of this index):
    # ``q0_kvar`` (n_flow,) at the operating point, ``dq_dp``/``dq_dq`` (n_flow, n_inj)
    # [kvar per kW / kvar of net import] (``build_linear_model(flows=...)``; empty without)
    flow_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    flow_q0_kvar: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flow_dq_dp: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    flow_dq_dq: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


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
        ``d|V| / dp`` [pu/kW] and ``d|V| / dq`` [pu/kvar] at the operating point, with
        ``p``, ``q`` the *net import* (consumption positive) of a node-to-ground element
        at the column node. The model is linear in ``u = dv_dp @ p + dv_dq @ q``
        (see module docstring): ``|V|^2 = |V0|^2 + 2 |V0| u``.
    """

    node_names: list[str]
    v0_pu: np.ndarray
    injection_nodes: list[str]
    dv_dp_pu_per_kw: np.ndarray
    dv_dq_pu_per_kvar: np.ndarray
    branches: BranchSensitivities | None = None

    def predict_i_a(self, p_kw: np.ndarray, q_kvar: np.ndarray) -> np.ndarray:
        """Branch conductor current magnitudes [A] after the power changes (first order).

        Needs a model built with ``branches=True``; shapes as in :meth:`predict_v_pu`.
        """
        if self.branches is None:
            raise InputError("this linear model was built without branches=True")
        b = self.branches
        p = np.asarray(p_kw, dtype=float)
        q = np.asarray(q_kvar, dtype=float)
        i0 = b.i0_a[:, None] if p.ndim == 2 else b.i0_a
        return np.maximum(i0 + b.di_dp_a_per_kw @ p + b.di_dq_a_per_kvar @ q, 0.0)

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
        u = self.dv_dp_pu_per_kw @ p + self.dv_dq_pu_per_kvar @ q
        v0 = self.v0_pu[:, None] if p.ndim == 2 else self.v0_pu
        return np.sqrt(np.maximum(v0**2 + 2 * v0 * u, 0.0))

    def u_limit_pu(self, v_limit_pu: float | np.ndarray) -> np.ndarray:
        """Bound on the linear quantity ``u`` equivalent to ``|V| = v_limit_pu``.

        ``|V| <= v_max`` is the linear constraint ``dv_dp @ p + dv_dq @ q <= u_limit_pu(v_max)``
        (and ``>=`` for a lower limit), per node [pu].
        """
        v0 = self.v0_pu
        return (np.asarray(v_limit_pu, dtype=float) ** 2 - v0**2) / (2 * v0)


def build_linear_model(
    engine, injection_nodes: Sequence[str] | None = None, *, load_band_pu: float = 0.05,
    branches: bool = False, groups: np.ndarray | None = None,
    group_names: Sequence[str] | None = None, flows: Sequence[int] | None = None,
) -> LinearModel:
    """Linearise a solved engine around its operating point.

    Parameters
    ----------
    engine : OpenDSSEngine
        Compiled and solved (snapshot) engine; it is only read, never re-solved.
    injection_nodes : sequence of str, optional
        Nodes "bus.node" (case-insensitive) where power may change. ``None`` = every node
        a load is connected to (memory: 16 bytes x n_nodes per injection node).
    load_band_pu : float
        Half-width [pu of each load's base] of the secant used for the loads' voltage
        dependence; 0 = tangent (exact Jacobian). See the module docstring.
    branches : bool
        Also compute branch-current sensitivities (:class:`BranchSensitivities`; memory:
        16 bytes x branch conductors per injection node).
    groups : ndarray, (len(injection_nodes), n_groups), optional
        Columns become groups of nodes: a power change ``P`` of group ``j`` puts
        ``groups[i, j] * P`` at injection node ``i`` (e.g. ``1/2`` at each node of a
        split-phase customer). One right-hand side per group instead of per node; the
        model's ``injection_nodes`` are then ``group_names`` (default ``group<j>``) and
        the floating-node warning is not computed.
    flows : sequence of int, optional
        Branch conductors (rows of the branch index, needs ``branches=True``) whose
        terminal-1 reactive power sensitivities are wanted (``d Im(V conj(I))``, e.g. what
        a kvar-type capacitor control measures); see :class:`BranchSensitivities`.

    Returns
    -------
    LinearModel

    Raises
    ------
    ModelError
        An unknown or de-energised injection node (named in the message).
    ConvergenceError
        The engine's last solve did not converge.
    """
    ckt = engine.circuit
    if not ckt.Solution.Converged:
        raise ConvergenceError("build_linear_model needs a solved engine (solve it first)")
    names = engine.node_names()
    pos = {s: k for k, s in enumerate(names)}
    y_of_out = np.fromiter((pos[s.lower()] for s in ckt.YNodeOrder), dtype=np.int64)
    y_of_out = np.argsort(y_of_out)  # Y index of each node in engine order
    v_y = complex_pairs(ckt.YNodeVarray)
    n = v_y.size
    v0 = v_y[y_of_out]  # from here on, everything is in engine node order

    br = read_branches(engine, v_y)
    if injection_nodes is None:
        ends = np.r_[br.node_i, br.node_j]
        inj = np.sort(np.argsort(y_of_out)[np.unique(ends[ends >= 0])])
        inj_names = [names[k] for k in inj]
    else:
        inj_names = [str(x).strip().lower() for x in injection_nodes]
        if len(set(inj_names)) != len(inj_names):
            raise InputError("injection_nodes has duplicates")
        inj, inj_to = _injection_ends(inj_names, pos)
    if injection_nodes is None:
        inj_to = np.full(inj.size, -1, dtype=np.int64)
    pair = inj_to >= 0
    vd0 = v0[inj] - np.where(pair, v0[np.maximum(inj_to, 0)], 0.0)
    if (np.abs(vd0) == 0).any():
        dead = inj_names[int(np.flatnonzero(np.abs(vd0) == 0)[0])]
        raise ModelError(f"injection node {dead!r} is de-energised (0 V at the operating point)")
    perm2 = np.empty(2 * n, dtype=np.int64)
    perm2[0::2], perm2[1::2] = 2 * y_of_out, 2 * y_of_out + 1
    jac = network_jacobian(engine, v_y, br, load_band_pu)[perm2][:, perm2].tocsr()
    bus = np.unique([s.rsplit(".", 1)[0] for s in names], return_inverse=True)[1]
    solver = LeafSolver(jac, np.repeat(bus, 2))

    base_v = _node_bases_v(engine)
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = np.where(np.abs(v0) > 0, np.conj(v0) / (np.abs(v0) * base_v), 0)
    node_perm = solver.perm[0::2] // 2  # solver keeps (Re, Im) of a node adjacent
    pr, pi = proj.real[node_perm, None], -proj.imag[node_perm, None]
    # ungrounded areas: the line-to-line magnitude |V_a - V_b| / (sqrt(3) base) is the
    # measure (derms.powerflow.voltage_measure); its rows differ the two nodes' changes
    v_pair = engine.voltage_pairs()
    ll = np.flatnonzero(v_pair >= 0)
    v0_pu = np.abs(v0) / base_v
    if ll.size:
        at = np.empty(n, dtype=np.int64)
        at[node_perm] = np.arange(n)  # solver position of each engine node
        q_ll, q_to = at[ll], at[v_pair[ll]]
        vd_ll = v0[ll] - v0[v_pair[ll]]
        proj_ll = np.conj(vd_ll) / (np.abs(vd_ll) * np.sqrt(3.0) * base_v[ll])
        v0_pu[ll] = np.abs(vd_ll) / (np.sqrt(3.0) * base_v[ll])
    n_out = inj.size if groups is None else np.shape(groups)[-1]
    dvp = np.empty((n, n_out))
    dvq = np.empty((n, n_out))
    if branches:
        m_br, index = branch_current_matrix(engine)
        i0 = m_br @ v0
        i0_a = np.abs(i0)
        with np.errstate(divide="ignore", invalid="ignore"):
            proj_i = np.where(i0_a > 0, np.conj(i0) / i0_a, 0)
        dip = np.empty((m_br.shape[0], n_out))
        diq = np.empty((m_br.shape[0], n_out))
        fl = np.asarray(flows if flows is not None else [], dtype=np.int64)
        m_fl = m_br[fl]
        fl_node = np.array([pos[f"{index.branch_bus1[k]}.{index.branch_phase[k]}"]
                            for k in fl], dtype=np.int64)
        s0_fl = v0[fl_node] * np.conj(i0[fl])  # VA into terminal 1
        dqp = np.empty((fl.size, n_out))
        dqq = np.empty((fl.size, n_out))
    # RHS: an import dS at node k injects the current -conj(dS / V0_k); 1 kW = 1000 W.
    # Between two nodes: -conj(dS / (V0_a - V0_b)) at a and the opposite at b.
    cur_p = -1000.0 / np.conj(vd0)
    cur_q = 1000.0j / np.conj(vd0)
    re_pos = solver.pos[2 * inj]
    to_pos = solver.pos[2 * np.maximum(inj_to, 0)]
    if groups is not None:
        w = np.asarray(groups, dtype=float)
        if w.ndim != 2 or w.shape[0] != inj.size or not np.isfinite(w).all():
            raise InputError(f"groups must be a finite ({inj.size}, n_groups) array, got "
                             f"shape {w.shape}")
        n_cols = w.shape[1]
        inj_names = list(group_names) if group_names is not None else [
            f"group{j}" for j in range(n_cols)]
        if len(inj_names) != n_cols:
            raise InputError(f"{len(inj_names)} group names for {n_cols} groups")
    else:
        n_cols = inj.size
    for lo in range(0, n_cols, _BATCH_NODES):
        hi = min(lo + _BATCH_NODES, n_cols)
        m = hi - lo
        b = np.zeros((2 * n, 2 * m))
        if groups is None:
            k, c = re_pos[lo:hi], np.arange(m)
            b[k, c], b[k + 1, c] = cur_p[lo:hi].real, cur_p[lo:hi].imag
            b[k, m + c], b[k + 1, m + c] = cur_q[lo:hi].real, cur_q[lo:hi].imag
            two = np.flatnonzero(pair[lo:hi])  # the return current of two-node columns
            if two.size:
                k2, cp_, cq_ = to_pos[lo:hi][two], cur_p[lo:hi][two], cur_q[lo:hi][two]
                b[k2, two], b[k2 + 1, two] = -cp_.real, -cp_.imag
                b[k2, m + two], b[k2 + 1, m + two] = -cq_.real, -cq_.imag
        else:  # each group's RHS: its nodes' unit-power currents, weighted
            i, c = np.nonzero(w[:, lo:hi])
            wt = w[i, lo + c]
            for k, sgn in ((re_pos[i], 1.0), (to_pos[i], -1.0)):  # (return of pairs)
                if sgn < 0:
                    keep = pair[i]
                    k, c, wt, i = k[keep], c[keep], wt[keep], i[keep]
                np.add.at(b, (k, c), sgn * wt * cur_p[i].real)
                np.add.at(b, (k + 1, c), sgn * wt * cur_p[i].imag)
                np.add.at(b, (k, m + c), sgn * wt * cur_q[i].real)
                np.add.at(b, (k + 1, m + c), sgn * wt * cur_q[i].imag)
        x = solver.solve(b).reshape(n, 2, 2 * m)
        sens = pr * x[:, 0]
        sens += pi * x[:, 1]
        if ll.size:
            d = x[q_ll] - x[q_to]
            sens[q_ll] = proj_ll.real[:, None] * d[:, 0] - proj_ll.imag[:, None] * d[:, 1]
        dvp[node_perm, lo:hi] = sens[:, :m]
        dvq[node_perm, lo:hi] = sens[:, m:]
        if branches:
            dv = np.empty((n, 2 * m), dtype=complex)
            dv[node_perm] = x[:, 0] + 1j * x[:, 1]
            di = (proj_i[:, None] * (m_br @ dv)).real
            dip[:, lo:hi], diq[:, lo:hi] = di[:, :m], di[:, m:]
            if fl.size:  # dS = dV conj(I0) + V0 conj(dI), kvar
                ds = (dv[fl_node] * np.conj(i0[fl])[:, None]
                      + v0[fl_node, None] * np.conj(m_fl @ dv)).imag / 1e3
                dqp[:, lo:hi], dqq[:, lo:hi] = ds[:, :m], ds[:, m:]
    own = np.zeros(0) if groups is not None else np.maximum(
        np.abs(dvp[inj, np.arange(inj.size)]), np.abs(dvq[inj, np.arange(inj.size)]))
    # node-to-ground injections into an ungrounded area (its rows are line to line, so
    # their own sensitivity no longer shows it) or with an absurd driving point
    bad = (own > _FLOATING_PU_PER_KW) if groups is not None or own.size == 0 else (
        (own > _FLOATING_PU_PER_KW) | (~pair & (v_pair[inj] >= 0)))
    if bad.any():
        log.warning(
            "linear_model floating_nodes=%s driving_point_pu_per_kw=%.3g: no path to ground?"
            " a node-to-ground injection there is ill-posed (inject line to line: "
            "'bus.a.b')",
            ",".join(inj_names[k] for k in np.flatnonzero(bad)), own.max(),
        )
    sens_br = None
    if branches:
        sens_br = BranchSensitivities(index.branch_element.astype(str), index.branch_phase,
                                      i0_a, dip, diq, fl, s0_fl.imag / 1e3, dqp, dqq)
    return LinearModel(names, v0_pu, inj_names, dvp, dvq, sens_br)


def _injection_ends(names: list[str], pos: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Engine node index of each injection's first node and of its second node (-1 for a
    node-to-ground injection ``"bus.n"``; ``"bus.a.b"`` is between nodes a and b).
    ModelError names the first unknown node."""
    first = np.empty(len(names), dtype=np.int64)
    second = np.full(len(names), -1, dtype=np.int64)
    for k, name in enumerate(names):
        ends = term_nodes(name)
        if not ends or any(e not in pos for e in ends):
            raise ModelError(f"unknown node {name!r} (expected 'bus.node', or 'bus.a.b' for "
                             "an injection between two nodes)")
        first[k] = pos[ends[0]]
        if len(ends) == 2:
            second[k] = pos[ends[1]]
    return first, second


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
    engine, nodes: Sequence[str], p_kw: np.ndarray, q_kvar: np.ndarray, *, restore: bool = True
) -> np.ndarray:
    """Full AC check: add constant-power changes at nodes, solve, return |V| [pu].

    Each node gets a 1-phase wye load (node to ground) named ``dlin__<bus>__<node>``,
    constant PQ over the whole voltage range (``vlowpu=0 vminpu=0 vmaxpu=1000``,
    ``status=fixed`` so load multipliers do not scale it), disabled again afterwards.
    Controls act as the engine's control mode says (``set_control_mode("off")`` freezes
    them, as the linear model assumes).

    Parameters
    ----------
    engine : OpenDSSEngine
        A compiled engine in the mode to solve (e.g. snapshot).
    nodes : sequence of str
        "bus.node" names (node to ground), or "bus.a.b" (a 1-phase delta element
        between nodes a and b).
    p_kw, q_kvar : array_like, (len(nodes),)
        Net import added at each node [kW], [kvar], consumption positive.
    restore : bool
        Re-solve without the added loads afterwards, so the engine is back at its
        operating point (one more solve); otherwise it keeps the perturbed solution.

    Returns
    -------
    ndarray, (n_nodes,)
        Voltage magnitudes [pu] of all nodes in the engine's node order.
    """
    ckt = engine.circuit
    all_names = engine.node_names()
    known = set(all_names)
    loads, el = ckt.Loads, ckt.ActiveCktElement
    p = np.asarray(p_kw, dtype=float)
    q = np.asarray(q_kvar, dtype=float)
    if p.shape != (len(nodes),) or q.shape != (len(nodes),):
        raise InputError(f"p_kw {p.shape} and q_kvar {q.shape} must be ({len(nodes)},)")
    names = []
    ungrounded = {all_names[k] for k in np.flatnonzero(engine.voltage_pairs() >= 0)}
    for node in nodes:
        node = str(node).strip().lower()
        bus, *ends = node.split(".")
        reach = term_nodes(node)
        if not reach or any(e not in known for e in reach):
            raise ModelError(f"unknown node {node!r} (expected 'bus.node' or 'bus.a.b')")
        if len(ends) == 1 and node in ungrounded:
            raise InputError(f"node {node!r} is on an ungrounded (3-wire) part of the feeder: "
                             "a node-to-ground element there would ground it; inject line "
                             f"to line ('{bus}.a.b')")
        name = f"{_AC_PREFIX}{bus}__{'_'.join(ends)}"
        if ckt.SetActiveElement(f"Load.{name}") < 0:
            ckt.SetActiveBus(bus)
            kv = ckt.ActiveBus.kVBase or 1.0
            conn = "wye" if len(ends) == 1 else "delta"  # two nodes: line to line
            kv = kv if len(ends) == 1 else kv * np.sqrt(3.0)
            engine.command(
                f"New Load.{name} bus1={node} phases=1 conn={conn} kV={kv} kW=0 kvar=0 "
                "model=1 vlowpu=0 vminpu=0 vmaxpu=1000 status=fixed"
            )
        names.append(name)
    try:
        for name, pk, qk in zip(names, p, q):
            loads.Name = name
            el.Enabled = True
            loads.kW = float(pk)  # kW first: setting kW re-derives kvar from the pf
            loads.kvar = float(qk)
        engine.solve()
        return engine.node_voltages_pu()
    finally:
        for name in names:
            loads.Name = name
            el.Enabled = False
        if restore:
            engine.solve()
