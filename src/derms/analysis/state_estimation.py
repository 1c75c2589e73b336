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
* AMI active (and, where the meter has it, reactive) power of chosen estimated loads [kW],
  [kvar]: interval energy / interval length, the power the load *draws* (``LoadMult`` and
  its voltage law included), consumption positive;
* pseudo-measurements (priors) of every estimated load's P and Q, e.g. from profiles.

The estimate minimises ``sum(((z - h(x)) / sigma)**2)`` over meters, head and pseudo rows.
With the pseudo rows as a Gaussian prior ``x_p`` with covariance ``P = diag(sigma_p**2)``
each Gauss-Newton step is solved in measurement space (Woodbury / Kalman form)::

    x_{k+1} = x_p + P H^T S^-1 (z - h(x_k) + H (x_k - x_p)),   S = H P H^T + R

where ``R = diag(sigma_meas**2)`` and ``H`` (m_meas x 2 n_loads) is the Jacobian of the
measured quantities w.r.t. the load powers. ``S`` is only m_meas x m_meas (Cholesky), and
``h(x_k)`` is always read from a full AC solve with the loads set to ``x_k``.

AMI power rows measure a state directly (drawn = ``f x``, ``f`` = ``LoadMult`` x the load
law at the solved voltage, exactly ``LoadMult`` for constant-PQ loads). They are fused into
the prior in information form (``Pf^-1 = P^-1 + f^2 / sigma_ami^2`` per metered state,
``x_p`` replaced by the fused mean) before the Woodbury step, so ``S`` stays m_meas x m_meas
however many loads report power; ``f`` is linearised at the prior and re-read at each
iterate for the fused mean.

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
meter rows, ``sigma_ami^2 - f^2 Sigma_ii`` for AMI power rows and ``P_ii - Sigma_ii`` for
pseudo rows, with the posterior ``Sigma_ii = Pf_ii - Pf_ii^2 (H^T S^-1 H)_ii``; normalised
residuals ``r_i / sqrt(Omega_ii)`` feed the largest-normalised-residual test, and
``J = sum((r / sigma)**2)`` is compared with the chi-square quantile for
``m_meas + n_ami`` degrees of freedom (pseudo rows add as many rows as states). An AMI
power reading that is the only precise information on its load is nearly critical: an
error that keeps it within a couple of prior sigmas of the profile cannot be seen.

Load level
----------
With the head's P and Q metered, the pseudo loads without telemetry are first scaled by the
common factors that make the AC model's head power match the meters
(:mod:`derms.analysis.se_level`; a few AC solves, rounded to 2 % steps, nothing where the
mismatch is within the head's noise). A profile off for the whole feeder (truth 0.5 x base
on IEEE 8500) otherwise reads as independent errors of every load: 0.021-0.027 pu largest
error without the fit, 0.0026-0.0034 with it (bench/README.md). No level is applied where
none in 0.02-10x explains the head (generation the model does not know of), and the
estimate is made again without it where the head row then is the largest normalised
residual (a wrong head reading). A Gauss-Newton step whose AC solve fails is halved (the
last good state re-solved in between, from OpenDSS's ``init`` if the failed solve's
voltages do not let it solve); where every halving fails the estimate stops at the last
state that solved, not converged, with a note, instead of failing (EPRI ckt5 with
unmodelled PV exporting at half the customers: 0.022-0.025 pu against the pseudo power
flow's 0.09-0.10 that a failure left the monitor with).

Posterior
---------
Every estimate keeps what its posterior needs (:mod:`derms.analysis.se_posterior`): the
standard deviation of any quantity linear in the states (a branch current) and the
probability of a loading being over its limit, without forming the states' covariance.

Pseudo-measurement uncertainty
------------------------------
The pseudo sigma should be the standard deviation of the real loads around the profile
values given. Measured on IEEE 8500 (voltages only, sigma = 1 %, truth = base x
U(1 - s, 1 + s)): the largest error is smallest with the prior sigma at or somewhat below
the truth's sd, and an overstated prior costs more than an understated one (s = 0.2, sd
11.5 %: 0.0056 pu at a 10-15 % prior, 0.0104 at 29 %, 0.0175 at 50 %), because an
overstated prior lets each meter's noise move its own load. A utility rarely knows that
sd for the instant it estimates, so by default (``prior_scale="auto"``) every pseudo sigma
is scaled by one factor calibrated from the snapshot itself: the maximum-likelihood scale
of the prior given the innovation at the prior, combined with a prior that trusts the
sigmas as given to within a factor 1.4, and shaded down by one posterior standard
deviation to the extent the data inform it (:mod:`derms.analysis.se_prior`; ≈ 0.05 s on
IEEE 8500). On IEEE 8500 the result hardly depends on the sigma given: s = 0.2 / 0.3 /
0.5 give 0.0056 / 0.0078 / 0.0131 pu from a 30 % start (0.0137 at ±50 % from 50 %), against
0.0056 / 0.0078-0.0082 / 0.0123 with the correctly specified prior taken as given
(``bench/bench_state_estimation.py --sensitivity``); on five other feeders it lands
between the sigma given and the right one (``bench/bench_se_feeders.py``). The
calibration needs ``se_prior.MIN_ROWS`` voltage/head rows and no AMI power rows; otherwise, or with a number for ``prior_scale``, the sigmas are used as
given (times that number). With no sigma given, ``DEFAULT_PSEUDO_SIGMA_FRAC`` = 30 % of
|value| (floor 0.1 kW/kvar) is the starting point. ``chi2 / chi2_dof`` near 1 checks the
sigmas used (by construction close to 1 after the calibration).

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
* Information-limited where each meter is alone: one AMI voltage per service transformer
  leaves no redundancy at the customer bus (its own load moves it; one meter, one load).
  IEEE 8500, sigma = 1 % per meter, truth U(0.5, 1.5), 29 % prior (the truth's sd):
  largest node error 0.0102-0.0123 pu over 5 seeds (mean 0.00125 pu; 0.0100-0.0130 with
  the calibrated prior); the best linear estimate's posterior sd at the metered buses
  reaches 0.0056 pu, so the largest of ~6,000 metered errors cannot be held to 0.01 pu by
  this (or any linear) estimator under so wide a truth (U(0.7, 1.3): 0.0078 pu). Re-linearising H at the estimate
  (full Gauss-Newton) changes the error by < 0.0003 pu (0.0123 -> 0.0126; without noise
  0.0006 either way): the chord is not the limit. At sigma = 1/3 % the error is
  <= 0.0062 pu; with AMI kW of every load at 1 %, <= 0.0024 pu (kW + kvar: 0.0015 pu).
  Figures: bench/README.md "State estimation".
* Cost on IEEE 8500 (1,186 meter/head rows, 2,354 states): the adjoint solves (≈ 0.15 s
  in two threads, leaves and line sections eliminated in rounds) and the dense m x m
  algebra (≈ 0.15 s, + 0.05-0.09 s for the prior calibration) dominate; each AC solve
  ≈ 0.03 s; ≈ 0.65 s median per estimate at a new prior point, ≈ 0.3 s where ``H`` and
  ``H P H^T`` are reused (the same prior point, kept on ``engine.derived``), on the 2-core
  development machine (the same work varied by a third between idle runs). AMI power
  rows add no m x m work, only ``H^T S^-1 H``'s diagonal on their states (≈ 0.1 s when
  every load reports P and Q).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from scipy.stats import chi2 as _chi2

from derms.analysis.se_inputs import (
    DEFAULT_PSEUDO_SIGMA_FRAC,
    DEFAULT_PSEUDO_SIGMA_MIN,
    Measurements,
    check_ami,
    check_head,
    check_loads,
    check_log_scale,
    check_scale,
    check_voltages,
    telemetry_states,
)
from derms.analysis.se_jacobian import (
    CACHE_MAX_BYTES,
    JACOBIAN_KEY,
    activate_source,
    drawn_factor,
    measurement_jacobian,
    read_loads,
    write_loads,
)
from derms.analysis.se_level import LEVEL_P_MIN, LEVEL_RANGE, LoadLevel, fit_load_level
from derms.analysis.se_posterior import Posterior
from derms.analysis.se_prior import MIN_ROWS, calibrate_prior, tril_inplace
from derms.errors import ConvergenceError, InputError, ModelError
from derms.powerflow.collect import NetworkIndex, StepCollector
from derms.powerflow.linear_loads import read_branches
from derms.powerflow.network_jacobian import complex_pairs
from derms.threads import blas_single_threaded, run_beside

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StateEstimate:
    """Result of :func:`estimate_state`.

    ``v_pu`` (n_nodes,) estimated voltage magnitudes [pu] in ``node_names`` (engine) order;
    ``load_p_kw``/``load_q_kvar`` the estimated loads (``load_names`` order, consumption
    positive); ``head_p_kw``/``head_q_kvar`` the estimated head powers per phase.
    Residual rows are meters, head P, head Q, AMI P, AMI Q, pseudo P, pseudo Q, labelled
    by ``row_labels`` ("v:bus.node", "head_p:1", "ami_p:name", "load_p:name", ...);
    ``residual`` is ``z - h(x)`` in each row's unit, ``normalised_residual`` divides it by
    the residual's standard deviation (NaN for pseudo rows unless ``check_pseudo``).
    ``bad_data`` is the largest-normalised-residual test against ``lnr_threshold``; ``chi2``/``chi2_dof``/``chi2_threshold`` (99 % quantile) the global
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
    prior_scale: float = 1.0
    prior_log_scale_post: tuple[float, float] | None = None
    load_level: tuple[float, float] = (1.0, 1.0)
    posterior: Posterior | None = field(default=None, repr=False, compare=False)
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


@blas_single_threaded  # it runs its own threads (module docstring of derms.threads)
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
    prior_scale: float | str = "auto",
    prior_log_scale: tuple[float, float] | None = None,
    fit_level: bool = True,
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
    prior_scale : float or "auto"
        Multiplies every pseudo sigma (not those of ``meas.telemetry_loads``). ``"auto"``
        (default) calibrates it from the data (:mod:`derms.analysis.se_prior`: maximum
        likelihood of the innovation at the prior, pulled toward the sigmas given where
        the data say little, shaded down by its uncertainty), within 0.05-5x. It needs at
        least ``se_prior.MIN_ROWS`` voltage and head rows and no AMI power rows; otherwise
        the scale is ``prior_log_scale``'s mean where one is given, else 1 (a note says
        which). The scale used is ``StateEstimate.prior_scale``.
    prior_log_scale : (mean, sd), optional
        With ``"auto"`` (ignored with a number): what is believed of the log variance scale
        before this snapshot (default: the sigmas as given, sd
        ``se_prior.PRIOR_SD_LOG_BETA``); where the snapshot cannot calibrate, its mean is
        the scale used. A monitoring loop passes
        :class:`~derms.analysis.se_prior.ScaleTracker`'s ``prior()`` and feeds
        ``StateEstimate.prior_log_scale_post`` back to it (None when this estimate did not
        calibrate, or stopped at a bound).
    fit_level : bool
        With head P and Q measured, first scale the pseudo loads that carry no telemetry
        by the common factors that match the head's metered power in the AC model
        (:mod:`derms.analysis.se_level`; their sigmas scale up with a higher level, never
        down: a deficit the model cannot explain, such as PV it does not know of, is not
        taken for certainty, and the prior calibration narrows them where the data say
        so); ``StateEstimate.load_level`` says which. A profile whose level is off for
        the whole feeder otherwise reads as large independent errors of every load.

    Raises
    ------
    ModelError
        An unknown node or load (named), a de-energised meter node, no Vsource.
    InputError
        Non-finite values, non-positive sigmas, mismatched shapes.
    ConvergenceError
        An AC solve failed.

    Both errors name the field and the first offending entry (an AMI load that is not one
    of the estimated ``load_names`` is an InputError).
    """
    ckt = engine.circuit
    names = engine.node_names()
    pos = {s: k for k, s in enumerate(names)}
    y_names = [s.lower() for s in ckt.YNodeOrder]
    ypos = {s: k for k, s in enumerate(y_names)}
    n = len(y_names)
    v_nodes, z_v, s_v = check_voltages(meas, pos)
    lnames, xp, sp_, load_idx = check_loads(engine, meas)
    auto = check_scale(prior_scale)
    scale_prior = check_log_scale(prior_log_scale)
    fixed = telemetry_states(meas, lnames)  # states whose sigma no scale touches
    z_h, s_h, n_ph = check_head(engine, meas)
    a_cols, z_a, s_a, a_labels = check_ami(engine, meas, lnames)
    m = z_v.size + z_h.size
    notes: list[str] = []
    scale = 1.0 if auto else float(prior_scale)
    if auto and (m < MIN_ROWS or z_a.size):
        # nothing to calibrate from: the scale believed before (a tracker's), else 1
        auto = False
        scale = float(np.exp(0.5 * scale_prior[0])) if prior_log_scale is not None else 1.0
        why = "the prior_log_scale given" if prior_log_scale is not None else "as given"
        notes.append(f"pseudo sigmas x {scale:.3g}, {why} (prior_scale auto needs "
                     f">= {MIN_ROWS} voltage/head rows and no AMI power rows)")
    if not auto:
        sp_ = sp_ * np.where(fixed, 1.0, scale)
    k = lnames.size
    if m == 0 and z_a.size == 0:
        raise InputError("no voltage, head or AMI power measurements: nothing to estimate from")

    loads = ckt.Loads
    orig = read_loads(loads, load_idx)
    settings = engine.settings
    engine.set_control_mode("off")
    done = False
    try:
        level, start = LoadLevel(), []
        if fit_level and n_ph and z_h.size and (~fixed).any():
            try:
                level = _fit_level(engine, loads, load_idx, xp, fixed, z_h, s_h, n_ph, start)
            except ConvergenceError as exc:  # a trial level the feeder cannot carry
                notes.append(f"load level not fitted (an AC solve failed: {exc})")
            if level.unexplained:
                notes.append(f"head power not explained by a load level (P {LEVEL_P_MIN:g}"
                             f"-{LEVEL_RANGE[1]:g}x, Q {LEVEL_RANGE[0]:g}-{LEVEL_RANGE[1]:g}x;"
                             f" a mismatch of "
                             f"{level.mismatch_sigmas:.0f} sigma left): pseudo loads as "
                             "given (generation the model does not know of, or a wrong "
                             "head reading?)")
            if level.changed:
                f = np.where(fixed, 1.0, np.r_[np.full(k, level.p), np.full(k, level.q)])
                xp, sp_ = xp * f, sp_ * np.maximum(f, 1.0)
                notes.append(f"pseudo loads scaled by {level.p:.2f} (P) and {level.q:.2f} "
                             "(Q) to match the head's metered power")
                if level.p < LEVEL_RANGE[0]:
                    notes.append("the loads as a whole export at the metered head power: "
                                 "generation the model does not know of (behind-the-meter "
                                 "PV?); each load's own share is left to the meters")
        x = xp.copy()
        if level.solves != 1:  # (one solve: the fit's own at k = 1, the engine is at x)
            write_loads(loads, load_idx, x)
            v0 = start[0](level.p, level.q) if start else None
            if v0 is not None:  # predicted from the fit's trials
                engine.start_voltages(v0)
            engine.solve()
        v_y = complex_pairs(ckt.YNodeVarray)
        mv_y = np.fromiter((ypos[s] for s in v_nodes), dtype=np.int64, count=len(v_nodes))
        if (np.abs(v_y[mv_y]) == 0).any():
            dead = v_nodes[int(np.flatnonzero(np.abs(v_y[mv_y]) == 0)[0])]
            raise ModelError(f"meter node {dead!r} is de-energised")
        y_of_e = np.fromiter((ypos[t] for t in names), dtype=np.int64, count=n)
        br = read_branches(engine, v_y)
        parts: dict = {}
        h_mat = (measurement_jacobian(engine, v_y, y_names, y_of_e, mv_y, lnames, x, n_ph, br,
                                      parts=parts)
                 if m else np.zeros((0, 2 * k)))
        r_diag = np.r_[s_v, s_h] ** 2
        p_diag = sp_**2
        # AMI power rows measure states directly (drawn = f x): fused into the prior in
        # information form, so S stays m x m. f (LoadMult x voltage law) is linearised at
        # the prior (pf, chord) and re-read at each iterate for the fused mean.
        mult = float(ckt.Solution.LoadMult)
        f0 = drawn_factor(br, v_y, lnames, xp, a_cols, mult) if z_a.size else np.zeros(0)
        info_a = np.zeros(2 * k)
        np.add.at(info_a, a_cols, f0**2 / s_a**2)
        pf = 1.0 / (1.0 / p_diag + info_a)
        g = h_mat * np.sqrt(pf)  # H Pf^(1/2)
        g_scale = np.ones(2 * k)  # H Pf^(1/2) as used is g x g_scale (by column)
        s_mat = _gram_lower(engine, h_mat, pf, g)  # m x m, lower triangle of H Pf H^T
        z = np.r_[z_v, z_h]
        mv_e = np.fromiter((pos[s] for s in v_nodes), dtype=np.int64, count=len(v_nodes))
        chol, post = None, None
        if auto:  # (no AMI power rows here: pf is p_diag)
            # telemetry states keep their sigma: calibrate the rest (their part of H P H^T
            # goes with the noise, its diagonal only)
            a_fix = _syrk_lower(g[:, fixed]) if fixed.any() else None
            a_free = s_mat if a_fix is None else s_mat - a_fix
            r_cal = r_diag if a_fix is None else r_diag + np.diag(a_fix)
            cal = calibrate_prior(a_free, r_cal, z - _measure(engine, mv_e, n_ph),
                                  prior=scale_prior)
            post = None if cal.at_bound else (cal.log_beta_post, cal.sd_log_beta_post)
            beta, scale = cal.beta, float(np.sqrt(cal.beta))
            s_mat, p_diag, sp_, g_scale = _scale_prior(fixed, beta, p_diag, sp_, a_free, a_fix)
            pf = p_diag
            if cal.at_bound:
                notes.append(f"maximum-likelihood prior scale {np.sqrt(cal.beta_ml):.3g} at "
                             "its bound: the pseudo sigmas are far from the spread the "
                             "meters see (not carried to the next estimate)")
            log.debug("state_estimation prior_scale=%.4f sd_log_beta=%.3f", scale,
                      cal.sd_log_beta)
        if m:
            s_mat[np.diag_indices(m)] += r_diag
            chol = sla.cho_factor(s_mat, lower=True, check_finite=False, overwrite_a=True)
            # diag(S^-1) for the residual statistics, computed beside the AC solves
            inv_job = run_beside(_inv_lower, tril_inplace(chol[0]))
        converged, it, f_k = False, 0, f0
        for it in range(1, max_iterations + 1):
            xf = xp
            if z_a.size:  # the AMI rows seen as observations of x: x_k + (z - f_k x_k) / f0
                y_a = x[a_cols] + (z_a - f_k * x[a_cols]) / f0
                num = xp / p_diag
                np.add.at(num, a_cols, f0**2 * y_a / s_a**2)
                xf = pf * num
            x_new = xf.copy()
            if m:
                hx = _measure(engine, mv_e, n_ph)
                dx_f = x - xf
                innov = z - hx + h_mat @ dx_f if dx_f.any() else z - hx  # (0 at the prior)
                x_new += pf * (h_mat.T @ sla.cho_solve(chol, innov, check_finite=False))
            if not np.isfinite(x_new).all():  # never write a NaN load into the engine
                bad = lnames[int(np.flatnonzero(~np.isfinite(x_new))[0]) % k]
                raise ConvergenceError(f"state estimation diverged at iteration {it} (load "
                                       f"{bad!r} not finite)")
            v_here = complex_pairs(ckt.YNodeVarray)
            x_new, damped = _damped_solve(engine, loads, load_idx, x, x_new,
                                          _predict(parts, v_here, x_new - x), v_here)
            if damped > MAX_HALVINGS:  # no step from x solves: stop there, not converged
                notes.append(f"iteration {it}: the AC solve failed at every step down to "
                             f"{0.5 ** MAX_HALVINGS:g} of it; the last state that solved is "
                             "reported (not converged)")
                break
            if damped:
                notes.append(f"iteration {it}: the AC solve failed at the full step; "
                             f"took {0.5 ** damped:g} of it")
            step = np.max(np.abs(x_new - x) / sp_) if k else 0.0
            x = x_new
            if z_a.size:
                v_k = complex_pairs(ckt.YNodeVarray)
                f_k = drawn_factor(br, v_k, lnames, xp, a_cols, mult)
            if step < tol and not damped:  # a shortened step is no sign of convergence
                converged = True
                break
        hx = _measure(engine, mv_e, n_ph)
        r_meas = z - hx
        r_ami = z_a - f_k * x[a_cols]
        r_pseudo = xp - x
        if m:
            l_inv, diag_s_inv = inv_job.result()
            om_meas = r_diag**2 * diag_s_inv  # R diag(S^-1) R
        else:
            l_inv, om_meas = np.zeros((0, 0)), np.zeros(0)
        # posterior variance of a state: Sigma_ii = pf_i - pf_i^2 d_i, d = diag(H^T S^-1 H)
        need = np.arange(2 * k) if check_pseudo else np.unique(a_cols)
        lg = l_inv @ (g[:, need] * g_scale[need])
        sig_post = np.zeros(2 * k)
        sig_post[need] = pf[need] - pf[need] * np.einsum("ij,ij->j", lg, lg)
        om_ami = s_a**2 - f0**2 * sig_post[a_cols]
        om_pseudo = p_diag - sig_post if check_pseudo else np.full(2 * k, np.nan)
        resid = np.r_[r_meas, r_ami, r_pseudo]
        sig = np.sqrt(np.r_[r_diag, s_a**2, p_diag])
        om = np.r_[om_meas, om_ami, om_pseudo]
        with np.errstate(divide="ignore", invalid="ignore"):
            nr = np.where(om > 1e-12 * sig**2, resid / np.sqrt(np.abs(om)), 0.0)
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
                  + a_labels + [f"load_p:{s}" for s in lnames] + [f"load_q:{s}" for s in lnames])
        if not converged:
            notes.append(f"not converged after {max_iterations} iterations")
            log.warning("state_estimation converged=false iterations=%d", it)
        dof = int(m + z_a.size)
        result = StateEstimate(
            node_names=names, v_pu=v_pu, load_names=list(lnames),
            load_p_kw=x[:k], load_q_kvar=x[k:],
            head_p_kw=head[:n_ph] if z_h.size else _head_now(engine, n_ph)[0],
            head_q_kvar=head[n_ph:] if z_h.size else _head_now(engine, n_ph)[1],
            row_labels=labels, residual=resid, normalised_residual=nr, chi2=j_stat,
            chi2_dof=dof, chi2_threshold=float(_chi2.ppf(0.99, dof)),
            largest_nr_row=int(np.nanargmax(np.abs(nr))), lnr_threshold=lnr_threshold,
            iterations=it, converged=converged, prior_scale=scale, prior_log_scale_post=post,
            load_level=(level.p, level.q),
            posterior=Posterior(h_mat, pf.copy(), chol[0] if chol is not None else None,
                                parts),
            notes=notes, **br,
        )
        done = True
    finally:
        back = restore or not done  # on an error, never leave the loads half-estimated
        if back:
            write_loads(loads, load_idx, orig)
        engine.apply_settings(settings)
        if back:
            try:
                engine.solve()
            except ConvergenceError:
                if done:
                    raise
    if (level.changed and result.bad_data
            and result.largest_nr_label.startswith(("head_p", "head_q"))):
        # the head reading is the suspect, and the level was fitted to it: estimate again
        # without it (a head 10 % high moved every pseudo load 8-10 %)
        again = estimate_state(engine, meas, index=index, max_iterations=max_iterations,
                               tol=tol, lnr_threshold=lnr_threshold,
                               check_pseudo=check_pseudo, restore=restore,
                               prior_scale=prior_scale, prior_log_scale=prior_log_scale,
                               fit_level=False)
        again.notes.insert(0, f"load level {level.p:.2f} / {level.q:.2f} not applied: the "
                              f"head row {result.largest_nr_label} is the largest normalised "
                              "residual (bad data?)")
        return again
    return result


MAX_HALVINGS = 6
LEVEL_TRIAL_TOL = 1e-5  # OpenDSS tolerance of the level fit's trial solves, at most


def _damped_solve(engine, loads, load_idx, x: np.ndarray, x_new: np.ndarray,
                  v_start: np.ndarray | None = None, v_here: np.ndarray | None = None
                  ) -> tuple[np.ndarray, int]:
    """Write ``x_new`` and solve; where the AC solve fails (a step the network cannot
    carry: reverse flow from generation the model does not know of), halve the step
    from ``x``, up to ``MAX_HALVINGS`` times. Returns the state solved at and the number
    of halvings; ``MAX_HALVINGS + 1`` when every step failed and the engine is back at
    ``x`` (the estimate stalls there). Raises :class:`ConvergenceError` only when ``x``
    itself no longer solves.

    ``v_start``: the voltages predicted at ``x_new`` (Y order), the full step's start;
    where the solve from it fails, the step is solved again from ``v_here`` (the
    solution at ``x``) before any halving, as without a prediction."""
    for halvings in range(MAX_HALVINGS + 1):
        write_loads(loads, load_idx, x_new)
        try:
            if halvings == 0 and v_start is not None:
                try:
                    engine.start_voltages(v_start)
                    engine.solve()
                    return x_new, 0
                except ConvergenceError:
                    engine.start_voltages(v_here)
            engine.solve()
            return x_new, halvings
        except ConvergenceError:
            # the failed solve leaves diverged voltages as the next one's start: solve the
            # last state that solved, from OpenDSS's initial point
            _solve_from_init(engine, loads, load_idx, x)
            if halvings == MAX_HALVINGS:
                return x, MAX_HALVINGS + 1
            x_new = x + 0.5 * (x_new - x)
    raise AssertionError("unreachable")


def _predict(parts: dict, v_y: np.ndarray, dx: np.ndarray) -> np.ndarray | None:
    """Node voltages (Y order) predicted after the load step ``dx`` from the solution
    ``v_y``: ``v_y + J^-1 E dx``, with the KCL Jacobian and load injections H was built
    from (one transposed solve of its factors). None without them. A start for the next
    AC solve only (OpenDSS iterates to its tolerance from it)."""
    solver, e_mat = parts.get("solver"), parts.get("e_mat")
    if solver is None or e_mat is None:
        return None
    rhs = np.asarray(e_mat @ dx, dtype=float)
    dv = np.empty_like(rhs)
    dv[solver.perm] = solver.solve_transposed(rhs[solver.perm])
    v = v_y + (dv[0::2] + 1j * dv[1::2])
    return v if np.isfinite(v).all() else None


def _inv_lower(chol_l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(L^-1, diag(S^-1))`` from the lower Cholesky factor ``L`` of ``S`` (upper zero;
    read only)."""
    l_inv, info = sla.lapack.dtrtri(chol_l, lower=1)
    if info != 0:
        raise ModelError("state estimation: singular measurement covariance")
    return l_inv, np.einsum("ij,ij->j", l_inv, l_inv)


def _solve_from_init(engine, loads, load_idx, x: np.ndarray) -> None:
    """Write ``x`` and solve it, from the present voltages and else from OpenDSS's initial
    point (after a failed solve the present voltages can be far off)."""
    write_loads(loads, load_idx, x)
    try:
        engine.solve()
    except ConvergenceError:
        engine.command("init")
        engine.solve()


def _scale_prior(fixed, beta, p_diag, sp_, a_free, a_fix):
    """Scale the prior variance of the non-telemetry states by ``beta`` (no AMI power rows,
    so ``Pf`` is ``P``): ``(H P H^T lower, P diag, sigmas, column factors on H P^1/2)``,
    where ``a_free`` (scaled in place: a fresh array) and ``a_fix`` (None without telemetry
    states) split ``H P H^T`` by the states. ``H P^1/2`` itself is not rescaled (a 2k x m
    pass): the few columns used later take the factors."""
    f = np.where(fixed, 1.0, beta)
    a_free *= beta
    if a_fix is not None:
        a_free += a_fix
    return a_free, p_diag * f, sp_ * np.sqrt(f), np.sqrt(f)


def _gram_lower(engine, h_mat: np.ndarray, pf: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Lower triangle of ``H Pf H^T`` (``g = H Pf^1/2``), a fresh array.

    Kept on the engine beside the measurement Jacobian it came from: the same H (the
    cached array itself) with the same prior variances gives the same product."""
    pf_key = hashlib.blake2b(np.ascontiguousarray(pf).tobytes(), digest_size=32).digest()
    cached = engine.derived.get(_GRAM)
    if cached is not None and cached[0] is h_mat and cached[1] == pf_key:
        return cached[2].copy()
    s_mat = _syrk_lower(g)
    engine.derived.pop(_GRAM, None)
    held = engine.derived.get(JACOBIAN_KEY)
    if held is not None and held[1] is h_mat and s_mat.nbytes <= CACHE_MAX_BYTES:
        engine.derived[_GRAM] = (h_mat, pf_key, s_mat.copy())  # beside the H it came from
    return s_mat


_GRAM = "se_gram_lower"


def _syrk_lower(g: np.ndarray) -> np.ndarray:
    """Lower triangle of ``g g^T`` (BLAS syrk: half a matrix product's work)."""
    if g.shape[0] == 0:
        return np.zeros((0, 0))
    return sla.blas.dsyrk(1.0, g.T, lower=1, trans=1)  # g.T is F-ordered: no copy


# -- measurement model ---------------------------------------------------------------------
def _measure(engine, mv_e: np.ndarray, n_ph: int) -> np.ndarray:
    """h(x) of the meter and head rows from the engine's present AC solution."""
    v = engine.node_voltages_pu()[mv_e]  # line to line on ungrounded areas
    if n_ph == 0:
        return v
    p, q = _head_now(engine, n_ph)
    return np.r_[v, p, q]


def _fit_level(engine, loads, load_idx, xp, fixed, z_h, s_h, n_ph: int, start: list):
    """:func:`~derms.analysis.se_level.fit_load_level` on the engine: the free pseudo
    loads scaled, one AC solve per trial (the loads are written back by the caller).

    Each trial solve starts from the node voltages predicted at its factors (affine in
    ``(k_p, k_q)`` through the first three solved trials, before that the nearest one
    solved): ``start`` is filled with the predictor, for the caller's solve at the
    level chosen (IEEE 8500: 35 -> 29 OpenDSS iterations there). Trials after the first
    (``k = 1``, the operating point where nothing changes) are solved to
    ``LEVEL_TRIAL_TOL`` where the engine's tolerance is tighter: they only compare the
    head's power with its meters (IEEE 8500: head P within 0.01 kW of the 1e-8
    solution, its sigma 127 kW; 44 -> 22 iterations per trial). Both save iterations
    only: the level is rounded to ``LEVEL_STEP`` and everything after it is solved at
    the engine's own tolerance."""
    k = xp.size // 2
    free_p, free_q = ~fixed[:k], ~fixed[k:]
    solved: list[tuple[float, float, np.ndarray]] = []  # (k_p, k_q, Y-order voltages)
    sol = engine.circuit.Solution

    def predict(kp: float, kq: float) -> np.ndarray | None:
        if len(solved) >= 3:
            a = np.array([[1.0, p, q] for p, q, _ in solved[:3]])
            if abs(np.linalg.det(a)) > 1e-12:
                c = np.linalg.solve(a, np.array([v for *_, v in solved[:3]]))
                return c[0] + kp * c[1] + kq * c[2]
        if not solved:
            return None
        return min(solved, key=lambda t: abs(t[0] - kp) + abs(t[1] - kq))[2]

    def head(kp: float, kq: float) -> tuple[float, float]:
        x = xp.copy()
        x[:k][free_p] *= kp
        x[k:][free_q] *= kq
        write_loads(loads, load_idx, x)
        v0 = predict(kp, kq)
        if v0 is not None:
            engine.start_voltages(v0)
        tol = float(sol.Tolerance)
        relax = bool(solved) and tol < LEVEL_TRIAL_TOL  # (the first, k = 1, may be kept)
        if relax:
            sol.Tolerance = LEVEL_TRIAL_TOL
        try:
            engine.solve()
        finally:
            if relax:
                sol.Tolerance = tol
        solved.append((kp, kq, complex_pairs(engine.circuit.YNodeVarray)))
        p, q = _head_now(engine, n_ph)
        return float(p.sum()), float(q.sum())

    start.append(predict)
    return fit_load_level(head, float(z_h[:n_ph].sum()), float(z_h[n_ph:].sum()),
                          float(np.sqrt(np.sum(s_h[:n_ph] ** 2))),
                          float(np.sqrt(np.sum(s_h[n_ph:] ** 2))),
                          free_p_kw=float(xp[:k][free_p].sum()),
                          free_q_kvar=float(xp[k:][free_q].sum()))


def _head_now(engine, n_ph: int) -> tuple[np.ndarray, np.ndarray]:
    ckt = engine.circuit
    activate_source(ckt)
    pw = np.asarray(ckt.ActiveCktElement.Powers, dtype=float)
    nph = int(ckt.ActiveCktElement.NumPhases)
    return -pw[0: 2 * nph: 2], -pw[1: 2 * nph: 2]


__all__ = ["DEFAULT_PSEUDO_SIGMA_FRAC", "DEFAULT_PSEUDO_SIGMA_MIN", "Measurements",
           "StateEstimate", "estimate_state"]
