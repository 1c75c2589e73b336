"""Three-phase weighted-least-squares state estimation on the OpenDSS network model.

Formulation
-----------
The state is the set of **load powers** ``x = (p_kw, q_kvar)`` of the estimated loads (the
loads' OpenDSS ``kW``/``kvar`` properties, consumption positive; ``LoadMult`` and each load's
voltage law apply on top, as in any OpenDSS solve). The node voltages follow from ``x``
by the full AC power flow of the engine, so every estimate is a physically consistent AC
solution (KCL holds exactly, zero-injection buses need no virtual measurements).

Measurements ``z`` with standard deviations ``sigma``:

* node voltage magnitudes [pu] at chosen nodes (AMI meters, SCADA at the head);
* feeder-head P and Q per phase [kW], [kvar] (power the feeder draws from the Vsource,
  import positive, as :class:`derms.powerflow.collect.StepCollector`'s ``head_p_kw``);
* pseudo-measurements (priors) of every estimated load's P and Q, e.g. from profiles.

The estimate minimises ``sum(((z - h(x)) / sigma)**2)`` over meters, head and pseudo rows.
With the pseudo rows as a Gaussian prior ``x_p`` with covariance ``P = diag(sigma_p**2)``
each Gauss-Newton step is solved in measurement space (Woodbury / Kalman form)::

    x_{k+1} = x_p + P H^T S^-1 (z - h(x_k) + H (x_k - x_p)),   S = H P H^T + R

where ``R = diag(sigma_meas**2)`` and ``H`` (m_meas x 2 n_loads) is the Jacobian of the
measured quantities w.r.t. the load powers. ``S`` is only m_meas x m_meas (Cholesky), and
``h(x_k)`` is always read from a full AC solve with the loads set to ``x_k``.

``H`` is computed once, at the AC solution of the pseudo-measurements, from the sparse
real ``2n x 2n`` KCL Jacobian of :mod:`derms.powerflow.linear` (network Y minus the loads'
own Yprim plus their linearised voltage laws). Each measured quantity is a linear
functional ``c`` of the node voltages, so its row is ``H_i = (J^-T c_i)^T E``: one
*adjoint* solve per measurement (batched, leaf elimination + SuperLU), where ``E`` (sparse,
2n x 2 n_loads) maps a load's kW/kvar to its branch currents. No nodes x nodes matrix is
formed; memory is 2n x m_meas doubles. Keeping ``H`` fixed makes the iteration a chord
(simplified Gauss-Newton) method: the fixed point is a stationary point of the objective
linearised with ``H`` at the prior, not at the optimum; the error this leaves is second
order in the load change and well below the measurement noise on the IEEE feeders (see
``tests/validation/test_state_estimation.py`` and ``bench/bench_state_estimation.py``).

Bad data: the residual covariance of the linearised estimator is ``Omega = R S^-1 R`` for
meter rows and ``P H^T S^-1 H P`` for pseudo rows; normalised residuals
``r_i / sqrt(Omega_ii)`` feed the largest-normalised-residual test, and
``J = sum((r / sigma)**2)`` is compared with the chi-square quantile for
``m_meas`` degrees of freedom (pseudo rows add as many rows as states).

Assumptions and limits
----------------------
* Topology, regulator taps and capacitor states are known and frozen (``controlmode=off``
  while estimating; the previous mode is restored). Taps come from SCADA in practice.
* Loads not named in the measurements keep their engine values (not estimated);
  generators, PV and storage are held at their engine setpoints (not estimated).
* A multi-phase load is one state pair (P, Q) split evenly over its phases as OpenDSS does;
  unbalance inside one load element is not estimated.
* Unobservable loads are held near their pseudo values (the prior regularises them); the
  estimate is only as good as the pseudo-measurements where meters do not reach.
* The Vsource is the head: head P/Q are its terminal powers. Head voltage is an ordinary
  voltage measurement at whichever head nodes are named.
* The engine is left solved at the estimate (loads set to the estimated kW/kvar), unless
  ``restore=True`` or the estimate fails (then the loads are put back).
* Noise-limited where each meter is alone: one AMI meter per service transformer and
  50 % priors leave no redundancy at the customer bus, so with sigma = 1 % per meter the
  largest node error on IEEE 8500 is 0.012-0.019 pu (mean 0.0014 pu), at sigma = 1/3 %
  0.007-0.009 pu; without noise 0.0002-0.0023 pu (bench/bench_state_estimation.py).
* Cost on IEEE 8500 (1,186 meter/head rows, 2,354 states): the adjoint solves
  (≈ 0.4 s) and the dense m x m algebra (≈ 0.2 s) dominate; each AC solve ≈ 0.02 s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from scipy.stats import chi2 as _chi2

from derms.analysis.se_jacobian import activate_source, measurement_jacobian
from derms.errors import ConvergenceError, InputError, ModelError
from derms.naming import require_known
from derms.powerflow.collect import NetworkIndex, StepCollector
from derms.powerflow.network_jacobian import complex_pairs

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Measurements:
    """One snapshot of telemetry for a feeder (vectorised; all arrays 1-D).

    Voltages: ``v_nodes`` ("bus.node", case-insensitive), ``v_pu`` [pu of each bus's base],
    ``v_sigma_pu`` [pu]. Head: ``head_p_kw``/``head_q_kvar`` per phase of the Vsource
    (import into the feeder positive) with ``head_p_sigma_kw``/``head_q_sigma_kvar``, or
    ``None``. Pseudo-measurements: ``load_names`` (OpenDSS load names, with or without
    ``load.``), ``load_p_kw``/``load_q_kvar`` (consumption positive, the loads' kW/kvar
    properties) with ``load_p_sigma_kw``/``load_q_sigma_kvar``; these loads are the state.
    """

    v_nodes: Sequence[str]
    v_pu: np.ndarray
    v_sigma_pu: np.ndarray
    load_names: Sequence[str]
    load_p_kw: np.ndarray
    load_q_kvar: np.ndarray
    load_p_sigma_kw: np.ndarray
    load_q_sigma_kvar: np.ndarray
    head_p_kw: np.ndarray | None = None
    head_q_kvar: np.ndarray | None = None
    head_p_sigma_kw: np.ndarray | None = None
    head_q_sigma_kvar: np.ndarray | None = None


@dataclass(frozen=True)
class StateEstimate:
    """Result of :func:`estimate_state`.

    ``v_pu`` (n_nodes,) estimated voltage magnitudes [pu] in ``node_names`` (engine) order;
    ``load_p_kw``/``load_q_kvar`` the estimated loads (``load_names`` order, consumption
    positive); ``head_p_kw``/``head_q_kvar`` the estimated head powers per phase.
    Residual rows are meters, head P, head Q, pseudo P, pseudo Q, labelled by
    ``row_labels`` ("v:bus.node", "head_p:1", "load_p:name", ...); ``residual`` is
    ``z - h(x)`` in each row's unit, ``normalised_residual`` divides it by the residual's
    standard deviation (NaN for pseudo rows unless ``check_pseudo``). ``bad_data`` is the largest-normalised-residual test against
    ``lnr_threshold``; ``chi2``/``chi2_dof``/``chi2_threshold`` (99 % quantile) the global
    test. Branch currents [A] and loading [% of the engine's normal rating] are present
    when an index was given (``branch_element``/``branch_phase`` name the rows).
    """

    node_names: list[str]
    v_pu: np.ndarray
    load_names: list[str]
    load_p_kw: np.ndarray
    load_q_kvar: np.ndarray
    head_p_kw: np.ndarray
    head_q_kvar: np.ndarray
    row_labels: list[str]
    residual: np.ndarray
    normalised_residual: np.ndarray
    chi2: float
    chi2_dof: int
    chi2_threshold: float
    largest_nr_row: int
    lnr_threshold: float
    iterations: int
    converged: bool
    branch_element: np.ndarray | None = None
    branch_phase: np.ndarray | None = None
    branch_i_a: np.ndarray | None = None
    branch_loading_pct: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bad_data(self) -> bool:
        """True when the largest normalised residual exceeds ``lnr_threshold``."""
        return bool(abs(self.normalised_residual[self.largest_nr_row]) > self.lnr_threshold)

    @property
    def largest_nr_label(self) -> str:
        return self.row_labels[self.largest_nr_row]


def estimate_state(
    engine,
    meas: Measurements,
    *,
    index: NetworkIndex | None = None,
    max_iterations: int = 10,
    tol: float = 1e-2,
    lnr_threshold: float = 4.0,
    check_pseudo: bool = False,
    restore: bool = False,
) -> StateEstimate:
    """Weighted-least-squares state estimate of one feeder (see module docstring).

    Parameters
    ----------
    engine : OpenDSSEngine
        Compiled feeder with taps/capacitors in their field state; it is re-solved.
    meas : Measurements
        Meters, head SCADA and pseudo-measurements (the pseudo loads are the state).
    index : NetworkIndex, optional
        If given, branch currents and loading of the estimate are collected.
    max_iterations : int
        Cap on Gauss-Newton (chord) iterations, each one AC solve.
    tol : float
        Converged when every state moves by less than ``tol`` x its pseudo sigma.
    lnr_threshold : float
        Largest-normalised-residual threshold for ``bad_data`` (4 by default: with
        thousands of rows, 3 is exceeded by chance).
    check_pseudo : bool
        Also normalise the pseudo-measurement residuals (their rows are NaN otherwise):
        one more m x m x 2 n_loads product (≈ 0.15 s on IEEE 8500). Bad data is looked
        for in the telemetry rows either way.
    restore : bool
        Put the loads back to their original kW/kvar and re-solve afterwards.

    Raises
    ------
    ModelError
        An unknown node or load (named), a de-energised meter node, no Vsource.
    InputError
        Non-finite values, non-positive sigmas, mismatched shapes.
    ConvergenceError
        An AC solve failed.
    """
    ckt = engine.circuit
    names = engine.node_names()
    pos = {s: k for k, s in enumerate(names)}
    y_names = [s.lower() for s in ckt.YNodeOrder]
    ypos = {s: k for k, s in enumerate(y_names)}
    n = len(y_names)
    v_nodes, z_v, s_v = _check_voltages(meas, pos)
    lnames, xp, sp_, load_idx = _check_loads(engine, meas)
    z_h, s_h, n_ph = _check_head(engine, meas)
    m = z_v.size + z_h.size
    k = lnames.size
    if m == 0:
        raise InputError("no voltage or head measurements: nothing to estimate from")

    loads = ckt.Loads
    orig = _read_loads(loads, load_idx)
    settings = engine.settings
    engine.set_control_mode("off")
    done = False
    try:
        x = xp.copy()
        _write_loads(loads, load_idx, x)
        engine.solve()
        v_y = complex_pairs(ckt.YNodeVarray)
        mv_y = np.fromiter((ypos[s] for s in v_nodes), dtype=np.int64, count=len(v_nodes))
        if (np.abs(v_y[mv_y]) == 0).any():
            dead = v_nodes[int(np.flatnonzero(np.abs(v_y[mv_y]) == 0)[0])]
            raise ModelError(f"meter node {dead!r} is de-energised")
        y_of_e = np.fromiter((ypos[t] for t in names), dtype=np.int64, count=n)
        h_mat = measurement_jacobian(engine, v_y, y_names, y_of_e, mv_y, lnames, x, n_ph)
        r_diag = np.r_[s_v, s_h] ** 2
        p_diag = sp_**2
        g = h_mat * sp_  # H P^(1/2)
        s_mat = g @ g.T  # m x m, symmetric rank-k update
        s_mat[np.diag_indices(m)] += r_diag
        chol = sla.cho_factor(s_mat, lower=True, check_finite=False)
        z = np.r_[z_v, z_h]
        mv_e = np.fromiter((pos[s] for s in v_nodes), dtype=np.int64, count=len(v_nodes))
        converged, it = False, 0
        for it in range(1, max_iterations + 1):
            hx = _measure(engine, mv_e, n_ph)
            innov = z - hx + h_mat @ (x - xp)
            x_new = xp + p_diag * (h_mat.T @ sla.cho_solve(chol, innov, check_finite=False))
            step = np.max(np.abs(x_new - x) / sp_) if k else 0.0
            x = x_new
            _write_loads(loads, load_idx, x)
            engine.solve()
            if step < tol:
                converged = True
                break
        hx = _measure(engine, mv_e, n_ph)
        r_meas = z - hx
        r_pseudo = xp - x
        l_inv, info = sla.lapack.dtrtri(np.tril(chol[0]), lower=1)
        if info != 0:
            raise ModelError("state estimation: singular measurement covariance")
        om_meas = r_diag**2 * np.einsum("ij,ij->j", l_inv, l_inv)  # R diag(S^-1) R
        if check_pseudo:
            lg = l_inv @ g
            om_pseudo = p_diag * np.einsum("ij,ij->j", lg, lg)  # P H^T S^-1 H P
        else:
            om_pseudo = np.full(2 * k, np.nan)
        resid = np.r_[r_meas, r_pseudo]
        sig = np.sqrt(np.r_[r_diag, p_diag])
        om = np.r_[om_meas, om_pseudo]
        with np.errstate(divide="ignore", invalid="ignore"):
            nr = np.where(om > 1e-12 * sig**2, resid / np.sqrt(om), 0.0)
        nr[np.isnan(om)] = np.nan
        j_stat = float(np.sum((resid / sig) ** 2))
        v_pu = engine.node_voltages_pu()
        head = hx[z_v.size:]
        br = {}
        if index is not None:
            col = StepCollector(engine, index, 1)
            col.collect(0)
            i_a = col.i_a[0].astype(float)
            with np.errstate(divide="ignore", invalid="ignore"):
                load_pct = np.where(index.branch_norm_a > 0, 100 * i_a / index.branch_norm_a,
                                    np.nan)
            br = {"branch_element": index.branch_element, "branch_phase": index.branch_phase,
                  "branch_i_a": i_a, "branch_loading_pct": load_pct}
        labels = ([f"v:{s}" for s in v_nodes]
                  + [f"head_p:{p + 1}" for p in range(n_ph if z_h.size else 0)]
                  + [f"head_q:{p + 1}" for p in range(n_ph if z_h.size else 0)]
                  + [f"load_p:{s}" for s in lnames] + [f"load_q:{s}" for s in lnames])
        notes = [] if converged else [f"not converged after {max_iterations} iterations"]
        if not converged:
            log.warning("state_estimation converged=false iterations=%d", it)
        dof = int(m)
        result = StateEstimate(
            node_names=names, v_pu=v_pu, load_names=list(lnames),
            load_p_kw=x[:k], load_q_kvar=x[k:],
            head_p_kw=head[:n_ph] if z_h.size else _head_now(engine, n_ph)[0],
            head_q_kvar=head[n_ph:] if z_h.size else _head_now(engine, n_ph)[1],
            row_labels=labels, residual=resid, normalised_residual=nr, chi2=j_stat,
            chi2_dof=dof, chi2_threshold=float(_chi2.ppf(0.99, dof)),
            largest_nr_row=int(np.nanargmax(np.abs(nr))), lnr_threshold=lnr_threshold,
            iterations=it, converged=converged, notes=notes, **br,
        )
        done = True
    finally:
        back = restore or not done  # on an error, never leave the loads half-estimated
        if back:
            _write_loads(loads, load_idx, orig)
        engine.apply_settings(settings)
        if back:
            try:
                engine.solve()
            except ConvergenceError:
                if done:
                    raise
    return result


# -- measurement model ---------------------------------------------------------------------
def _measure(engine, mv_e: np.ndarray, n_ph: int) -> np.ndarray:
    """h(x) of the meter and head rows from the engine's present AC solution."""
    v = np.asarray(engine.circuit.AllBusVmagPu, dtype=float)[mv_e]
    if n_ph == 0:
        return v
    p, q = _head_now(engine, n_ph)
    return np.r_[v, p, q]


def _head_now(engine, n_ph: int) -> tuple[np.ndarray, np.ndarray]:
    ckt = engine.circuit
    activate_source(ckt)
    pw = np.asarray(ckt.ActiveCktElement.Powers, dtype=float)
    nph = int(ckt.ActiveCktElement.NumPhases)
    return -pw[0: 2 * nph: 2], -pw[1: 2 * nph: 2]


def _read_loads(loads, idx: np.ndarray) -> np.ndarray:
    p, q = np.empty(idx.size), np.empty(idx.size)
    for j, i in enumerate(idx):
        loads.idx = int(i)
        p[j], q[j] = loads.kW, loads.kvar
    return np.r_[p, q]


def _write_loads(loads, idx: np.ndarray, x: np.ndarray) -> None:
    k = idx.size
    for j, i in enumerate(idx):
        loads.idx = int(i)
        loads.kW = float(x[j])  # kW first: setting kW re-derives kvar from the pf
        loads.kvar = float(x[k + j])


# -- input checks --------------------------------------------------------------------------
def _arr(name: str, v, size: int | None = None) -> np.ndarray:
    a = np.asarray(v, dtype=float).ravel()
    if size is not None and a.size != size:
        raise InputError(f"{name} has {a.size} values, expected {size}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise InputError(f"{name}[{bad}] is not finite ({a[bad]})")
    return a


def _sigma(name: str, v, size: int) -> np.ndarray:
    a = _arr(name, v, size)
    if (a <= 0).any():
        bad = int(np.flatnonzero(a <= 0)[0])
        raise InputError(f"{name}[{bad}] = {a[bad]} must be a positive standard deviation")
    return a


def _check_voltages(meas: Measurements, pos: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    nodes = require_known(meas.v_nodes, pos, kind="meter node", field="v_nodes",
                          hint=" (expected 'bus.node')")
    return nodes, _arr("v_pu", meas.v_pu, len(nodes)), _sigma("v_sigma_pu", meas.v_sigma_pu,
                                                              len(nodes))


def _check_loads(engine, meas: Measurements):
    all_loads = [s.lower() for s in engine.circuit.Loads.AllNames]
    if all_loads == ["none"]:
        all_loads = []
    at = {s: i + 1 for i, s in enumerate(all_loads)}
    names = require_known((str(s).strip().lower().removeprefix("load.")
                           for s in meas.load_names), at, kind="load", field="load_names")
    k = len(names)
    xp = np.r_[_arr("load_p_kw", meas.load_p_kw, k), _arr("load_q_kvar", meas.load_q_kvar, k)]
    sp_ = np.r_[_sigma("load_p_sigma_kw", meas.load_p_sigma_kw, k),
                _sigma("load_q_sigma_kvar", meas.load_q_sigma_kvar, k)]
    idx = np.fromiter((at[s] for s in names), dtype=np.int64, count=k)
    return np.asarray(names, dtype=object), xp, sp_, idx


def _check_head(engine, meas: Measurements) -> tuple[np.ndarray, np.ndarray, int]:
    given = [meas.head_p_kw is not None, meas.head_q_kvar is not None,
             meas.head_p_sigma_kw is not None, meas.head_q_sigma_kvar is not None]
    if not any(given):
        return np.zeros(0), np.zeros(0), 0
    if not all(given):
        raise InputError("head_p_kw, head_q_kvar and their sigmas go together")
    ckt = engine.circuit
    activate_source(ckt)
    nph = int(ckt.ActiveCktElement.NumPhases)
    z = np.r_[_arr("head_p_kw", meas.head_p_kw, nph), _arr("head_q_kvar", meas.head_q_kvar, nph)]
    s = np.r_[_sigma("head_p_sigma_kw", meas.head_p_sigma_kw, nph),
              _sigma("head_q_sigma_kvar", meas.head_q_sigma_kvar, nph)]
    return z, s, nph


__all__ = ["Measurements", "StateEstimate", "estimate_state"]
