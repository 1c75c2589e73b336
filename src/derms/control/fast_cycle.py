"""The fast corrective cycle of the control loop (issue 9): estimate → detect → arbitrate →
correct → command, timed stage by stage.

One :meth:`FastCycle.run` (default period 5 s):

1. **State estimate.** The DERs' present outputs (telemetry, net import) are written to
   the model as fixed constant-power loads, one per injection-point node (``fcder_…``);
   then :func:`derms.analysis.state_estimation.estimate_state` runs on the customer loads
   (the engine is left solved at the estimate), or a given estimate is written back and
   solved, or — without telemetry — the model's present loads are solved.
2. **Detection** (vectorised over all nodes and branch conductors). Limits follow
   DESIGN.md: [0.95, 1.05] pu ± 0.001 pu, 100 % of the normal rating + 1 %; an element
   that breaks a limit in the base case is held to its base-case value instead. The base
   case is, by default, this interval's: the estimate re-solved with the DER loads at
   zero (two AC solves; "the same interval without the controlled DERs").
   *Present* violations are beyond limit + tolerance;
   *imminent* ones are projected beyond the limit ``lead_cycles`` ahead by the trend of the
   last ``trend_cycles`` estimates (linear, first to last, only if the change is monotone
   over the window, so estimation noise does not fire it). The trend history restarts
   after a cycle that issued commands (the response to our own action is not a trend).
   Rows for the corrective step: every energised phase node and rated branch conductor
   within ``near_v_pu`` / ``near_i_frac`` of a limit (or beyond), worst first, at most
   ``max_v_rows`` / ``max_i_rows``; imminent rows enter at their projected value.
3. **Arbitration.** Devices covered by an active request are resolved by the
   :class:`~derms.control.arbiter.Arbiter`: a blocked device is fixed and gets no command;
   a device holding a setpoint of a higher authority than optimisation (an operator
   setpoint) is fixed; device export/import limits clamp its range. DERs the caller marks
   ``FleetNow.fixed`` (stale telemetry, a DER that did not deliver: see
   :mod:`derms.control.loop`) are fixed at their telemetry too and get no command.
4. **Corrective action** only when something is violated or imminent: adjoint
   sensitivities of the selected rows at the estimate
   (:class:`~derms.powerflow.linear_rows.RowSensitivities`) and the LP of
   :func:`~derms.dispatch.corrective.solve_corrective` (weights = 1 / delivery score);
   then the model's AC solve with the new setpoints, and rows it finds beyond a limit
   join the LP (at most ``ac_rounds`` AC solves): rows that were far from a limit before
   the action (a head conductor that PV curtailment loads up) are caught there.
5. **Commands** (:class:`~derms.control.commands.DeviceCommand`) for the moved DERs, valid
   ``hold_s`` from now: PV as export limits, EV chargers as import limits, others as
   setpoints. A DER whose active command already says the same (within ``deadband_kw``)
   and does not expire before the next cycle gets none (one decision, one command).

Assumptions: taps and capacitors are known and frozen in the model (as in the state
estimator); DER telemetry is fresh (stale telemetry handling is the monitoring part's);
feeder and section aggregate limits are not enforced here (the slow re-plan's job).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri

from derms.analysis.se_posterior import describe_possible, possible_overloads
from derms.analysis.state_estimation import (
    DEFAULT_PSEUDO_SIGMA_FRAC,
    DEFAULT_PSEUDO_SIGMA_MIN,
    Measurements,
    StateEstimate,
    estimate_state,
)
from derms.control.arbiter import Arbiter
from derms.control.commands import CommandIssuer, CommandMode, CommandSink, DeviceCommand
from derms.control.fast_cycle_types import (
    STAGES,
    CycleReport,
    DerRegistry,
    FastCycleConfig,
    FleetNow,
)
from derms.control.requests import CommandKind, DeviceLocation, ScopeKind, Source
from derms.dispatch.corrective import (
    CorrectiveResult,
    CurrentRows,
    DerState,
    VoltageRows,
    solve_corrective,
)
from derms.errors import InputError
from derms.powerflow.collect import StepCollector, build_index
from derms.powerflow.engine import OpenDSSEngine
from derms.powerflow.linear_rows import RowSensitivities
from derms.powerflow.voltage_measure import term_nodes
from derms.store.types import ensure_utc

log = logging.getLogger(__name__)
_PREFIX = "fcder_"
class FastCycle:
    """The fast cycle on one feeder model (module docstring).

    Parameters
    ----------
    engine : OpenDSSEngine
        The feeder model, compiled, taps and capacitors at their field state (they are
        frozen here). DER loads are added to it; the cycle owns it from now on.
    registry : DerRegistry
    sink : CommandSink
    arbiter : Arbiter, optional
    config : FastCycleConfig, optional
    base_v_pu, base_loading_pct : ndarray, optional
        A fixed base case (engine node / branch-conductor order) marking pre-existing
        violations (held to their base value). Left out, ``pre_existing`` says:
        "interval" (default) — each cycle's own base case, the estimate re-solved with
        the DERs at zero (DESIGN.md: the same interval without the controlled DERs; two
        more AC solves per cycle); "model" — the model as given with the DERs at zero,
        once; "none" — absolute limits.
    feeder_id : str
    """

    def __init__(self, engine: OpenDSSEngine, registry: DerRegistry, sink: CommandSink, *,
                 arbiter: Arbiter | None = None, config: FastCycleConfig | None = None,
                 base_v_pu: np.ndarray | None = None,
                 base_loading_pct: np.ndarray | None = None,
                 pre_existing: Literal["interval", "model", "none"] = "interval",
                 feeder_id: str = "feeder", issuer: CommandIssuer | None = None,
                 cycle_tag: str = "") -> None:
        self.engine, self.registry, self.sink = engine, registry, sink
        self.arbiter, self.config, self.feeder_id = arbiter, config or FastCycleConfig(), feeder_id
        engine.set_control_mode("off")
        self._add_der_loads()
        engine.solve()
        self.index = build_index(engine)
        self.node_names = np.asarray(engine.node_names(), dtype=object)
        self.branch_labels = np.array([f"{e}.{p}" for e, p in zip(
            self.index.branch_element, self.index.branch_phase)], dtype=object)
        self.sens = RowSensitivities(engine, registry.points, self.index)
        self._posterior = None  # this cycle's estimate's (se_posterior.Posterior)
        self._i_margin: np.ndarray | None = None  # chance-constraint margin [A] per row
        if pre_existing not in ("interval", "model", "none"):
            raise InputError(f"pre_existing {pre_existing!r}: interval, model or none")
        given = base_v_pu is not None or base_loading_pct is not None
        self.per_interval = pre_existing == "interval" and not given
        if pre_existing == "model" and not given:
            base_v_pu, i_a = self._read_state()  # DER loads at zero: the base case
            base_loading_pct = self._loading(i_a)
        self._limits(base_v_pu, base_loading_pct)
        self._history: deque[tuple[np.ndarray, np.ndarray]] = deque(
            maxlen=max(2, self.config.trend_cycles))
        # ``issuer``: one carried over (a rebuild on new topology) or seeded from the
        # tracked commands (a restart), so a standing decision keeps its command id;
        # ``cycle_tag`` keeps cycle (and so command) ids unique across restarts
        # this cycle's arbiter decisions (time, {registry position: Decision}), resolved
        # once for the authority commands and the corrective step's bounds
        self._decided: tuple[tuple | None, dict] = (None, {})
        # DERs whose last command is an authority's (None: not known yet -- after a
        # restart the issuer is seeded from the tracked commands, read once)
        self._auth_ders: set[str] | None = None
        self._issuer = issuer or CommandIssuer(self.config.hold_s, self.config.period_s,
                                               self.config.deadband_kw)
        self.cycle_tag = cycle_tag
        self._kinds = np.asarray(registry.kind).astype(str)
        self._n = 0
        self._loc_maps()

    @property
    def issuer(self) -> CommandIssuer:
        """The command issuer (its ``last`` command per DER decides what is re-issued)."""
        return self._issuer

    # -- set-up ------------------------------------------------------------------------
    def _add_der_loads(self) -> None:
        """One fixed constant-PQ load per injection-point node (kW = kvar = 0 to start)."""
        eng, ckt = self.engine, self.engine.circuit
        # the bus of every load of the model (AMI power there is net of the DERs behind
        # the meter: see _with_ders)
        self._load_bus = {}
        for name in ckt.Loads.AllNames:
            ckt.SetActiveElement(f"load.{name}")
            self._load_bus[name.lower()] = ckt.ActiveCktElement.BusNames[0].split(".")[0].lower()
        nodes = sorted({s.strip().lower() for pt in self.registry.points for s in pt})
        known = set(eng.node_names())
        bad = [s for s in nodes if not term_nodes(s) or any(e not in known
                                                            for e in term_nodes(s))]
        if bad:
            raise InputError(f"DER injection node(s) not in the model: {bad[:5]}")
        for s in nodes:
            bus = s.split(".")[0]
            ckt.SetActiveBus(bus)
            kv = ckt.ActiveBus.kVBase or 1.0
            # "bus.a.b": between two phases (ungrounded feeders), line-to-line kV
            conn, kv = ("delta", kv * np.sqrt(3.0)) if len(term_nodes(s)) == 2 else ("wye", kv)
            eng.command(f"new load.{_PREFIX}{s.replace('.', '_')} bus1={s} phases=1 "
                        f"conn={conn} kv={kv} kw=0 kvar=0 model=1 vminpu=0 vmaxpu=1000 "
                        "vlowpu=0 status=fixed")
        names = [x.lower() for x in ckt.Loads.AllNames]
        at = {x: i + 1 for i, x in enumerate(names)}
        node_pos = {s: k for k, s in enumerate(nodes)}
        self._der_load_names = [_PREFIX + s.replace(".", "_") for s in nodes]
        self._der_node_bus = np.array([s.split(".")[0] for s in nodes], dtype=object)
        self._der_load_idx = np.array([at[x] for x in self._der_load_names])
        rows, cols, vals = [], [], []  # (node, point) shares
        for k, pt in enumerate(self.registry.points):
            for s in pt:
                rows.append(node_pos[s.strip().lower()])
                cols.append(k)
                vals.append(1.0 / len(pt))
        self._node_share = sp.csr_matrix((vals, (rows, cols)),
                                         shape=(len(nodes), len(self.registry.points)))

    def _loading(self, i_a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.index.branch_norm_a > 0,
                            100 * i_a / self.index.branch_norm_a, 0.0)

    def _interval_base(self) -> None:
        """This interval's base case: the estimate re-solved with the DER loads at zero;
        the loads are put back and the estimate re-solved."""
        loads = self.engine.circuit.Loads
        saved = []
        for i in self._der_load_idx:
            loads.idx = int(i)
            saved.append((loads.kW, loads.kvar))
            loads.kW = 0.0
            loads.kvar = 0.0
        self.engine.solve()
        v, i_a = self._read_state()
        for i, (p, q) in zip(self._der_load_idx, saved):
            loads.idx = int(i)
            loads.kW = p
            loads.kvar = q
        self.engine.solve()
        self._limits(v, self._loading(i_a))

    def _limits(self, base_v, base_load) -> None:
        lim, ix = self.config.limits, self.index
        n, nb = ix.n_nodes, ix.n_branch_conductors
        self.v_max = np.full(n, lim.v_max_pu)
        self.v_min = np.full(n, lim.v_min_pu)
        rated = ix.branch_norm_a > 0
        self.i_max = np.where(rated, ix.branch_norm_a * lim.thermal_pct / 100.0, np.inf)
        self.v_pre = np.zeros(n, dtype=bool)
        self.i_pre = np.zeros(nb, dtype=bool)
        if base_v is not None:
            bv = np.asarray(base_v, dtype=float)
            if bv.shape != (n,):
                raise InputError(f"base_v_pu has shape {bv.shape}, expected ({n},)")
            hi = bv > lim.v_hi_count_pu
            lo = (bv < lim.v_lo_count_pu) & (bv >= lim.energised_min_pu)
            self.v_max = np.where(hi, bv, self.v_max)
            self.v_min = np.where(lo, bv, self.v_min)
            self.v_pre = hi | lo
        if base_load is not None:
            bl = np.nan_to_num(np.asarray(base_load, dtype=float))
            if bl.shape != (nb,):
                raise InputError(f"base_loading_pct has shape {bl.shape}, expected ({nb},)")
            pre = rated & (bl > lim.thermal_count_pct)
            self.i_max = np.where(pre, ix.branch_norm_a * bl / 100.0, self.i_max)
            self.i_pre = pre
        self.phase_node = ix.node_phase <= 3

    def _loc_maps(self) -> None:
        locs = self.registry.locations
        ids = np.asarray(self.registry.der_id).astype(str)
        self._pos = {d: j for j, d in enumerate(ids)}
        if locs is None:
            self._locs = [DeviceLocation(d) for d in ids]
        else:
            self._locs = list(locs)
        self._feeder = np.array([loc.feeder_id for loc in self._locs], dtype=object)
        self._bus = np.array([loc.bus for loc in self._locs], dtype=object)
        self._cp = np.array([loc.connection_point for loc in self._locs], dtype=object)

    # -- one cycle ----------------------------------------------------------------------
    def run(self, now: datetime, fleet: FleetNow, *, measurements: Measurements | None = None,
            estimate: StateEstimate | None = None) -> CycleReport:
        """One cycle at ``now`` (module docstring). Give ``measurements`` (the estimate is
        run) or an ``estimate`` already made on this model, or neither (the model's loads
        as they are)."""
        now = ensure_utc(now, "now")
        cfg = self.config
        t0 = time.perf_counter()
        tm = dict.fromkeys(STAGES, 0.0)
        self._n += 1
        cycle_id = (f"fc-{self.feeder_id}-{now.strftime('%Y%m%dT%H%M%S')}-"
                    f"{self.cycle_tag}{self._n}")
        notes: list[str] = []
        f = self._check_fleet(fleet)
        p_node, q_node = self._write_der_loads(f["p_kw"], f["q_kvar"])
        est_info = self._estimate(measurements, estimate, p_node, q_node)
        v, i_a = self._read_state()
        loading_pct = self._loading(i_a)  # the estimated state, kept for the report
        tm["se_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        if self.per_interval:
            self._interval_base()
        possible, margin = self._possible_thermal(i_a, notes)
        if possible is not None:
            est_info["possible_overloads"] = possible
        self._i_margin = margin
        if margin is not None:  # chance-constrained rows: act on estimate + z sd
            i_a = i_a + margin
        det = self._detect(v, i_a)
        tm["detect_s"] = time.perf_counter() - t1
        result, commands, n_fixed, status, ac_check = None, [], 0, "clear", {}
        authority = self._authority(now, cycle_id, notes)  # every cycle, trigger or not
        if authority:
            self.sink.send(authority)
        if det["trigger"]:
            t2 = time.perf_counter()
            fixed, p_lo, p_hi, arb_notes = self._arbitrate(now, f)
            notes += arb_notes
            if fleet.fixed is not None:  # escalated or stale DERs: held at their telemetry
                held = np.asarray(fleet.fixed, dtype=bool).ravel()
                if held.size != fixed.size:
                    raise InputError(f"fleet fixed has {held.size} values for {fixed.size} DERs")
                if (held & ~fixed).any():
                    notes.append(f"{int((held & ~fixed).sum())} DER(s) held at their measured "
                                 "output (not relied upon): not moved, no command")
                fixed = fixed | held
            n_fixed = int(fixed.sum())
            tm["arbiter_s"] = time.perf_counter() - t2
            ders = DerState(
                der_id=np.asarray(self.registry.der_id), point=np.asarray(self.registry.point),
                p_kw=f["p_kw"], p_min_kw=p_lo, p_max_kw=p_hi, q_kvar=f["q_kvar"],
                q_min_kvar=f["q_min_kvar"], q_max_kvar=f["q_max_kvar"],
                weight=1.0 / np.clip(f["score"], cfg.min_score, 1.0), fixed=fixed)
            result, ac_check = self._correct(det, ders, tm, notes)
            status = result.status
            t5 = time.perf_counter()
            sel = np.flatnonzero(result.moved & ~fixed)
            reasons = result.explanations()
            commands = self._issuer.issue(
                now, cycle_id, result.der_id[sel].astype(str), self._kinds[sel],
                result.p_kw[sel], np.where(np.abs(result.dq_kvar[sel]) > 0, result.q_kvar[sel],
                                           np.nan), [reasons.get(str(d), "corrective action")
                                                     for d in result.der_id[sel]])
            if commands:
                self.sink.send(commands)
                self._history.clear()
            tm["commands_s"] = time.perf_counter() - t5
        commands = [*authority, *commands]
        tm["total_s"] = time.perf_counter() - t0
        return CycleReport(
            cycle_id=cycle_id, t=now, timings=tm, violations=det["counts"],
            imminent=det["imminent"], violated_rows=det["violated_labels"],
            n_rows=det["n_rows"], status=status, corrective=result, commands=commands,
            n_fixed=n_fixed, estimation=est_info, ac_check=ac_check, notes=notes,
            v_pu=v, branch_loading_pct=loading_pct)

    # -- stages -------------------------------------------------------------------------
    def _check_fleet(self, fleet: FleetNow) -> dict[str, np.ndarray]:
        n = np.asarray(self.registry.der_id).size
        out = {}
        for name in ("p_kw", "q_kvar", "p_min_kw", "p_max_kw", "q_min_kvar", "q_max_kvar",
                     "score"):
            a = np.asarray(getattr(fleet, name), dtype=float).ravel()
            if a.size != n:
                raise InputError(f"fleet {name} has {a.size} values for {n} DERs")
            if not np.isfinite(a).all():
                j = int(np.flatnonzero(~np.isfinite(a))[0])
                raise InputError(f"fleet {name}[{j}] (DER {self.registry.der_id[j]}) is not "
                                 f"finite ({a[j]})")
            out[name] = a
        return out

    def _write_der_loads(self, p_kw: np.ndarray, q_kvar: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        pt = np.asarray(self.registry.point)
        n_pts = len(self.registry.points)
        p_node = self._node_share @ np.bincount(pt, weights=p_kw, minlength=n_pts)
        q_node = self._node_share @ np.bincount(pt, weights=q_kvar, minlength=n_pts)
        loads = self.engine.circuit.Loads
        for i, pk, qk in zip(self._der_load_idx, p_node, q_node):
            loads.idx = int(i)
            loads.kW = float(pk)
            loads.kvar = float(qk)
        return p_node, q_node

    def _estimate(self, meas: Measurements | None, est: StateEstimate | None,
                  p_node: np.ndarray, q_node: np.ndarray) -> dict:
        self._posterior = None
        if meas is not None:
            e = estimate_state(self.engine, self._with_ders(meas, p_node, q_node),
                               restore=False)
            self._posterior = e.posterior
            return {"method": "wls", "converged": e.converged, "iterations": e.iterations,
                    "chi2_per_dof": e.chi2 / max(e.chi2_dof, 1), "bad_data": e.bad_data}
        if est is not None:  # write the estimated loads back and solve at them
            loads = self.engine.circuit.Loads
            at = {x.lower(): i + 1 for i, x in enumerate(loads.AllNames)}
            for name, p, q in zip(est.load_names, est.load_p_kw, est.load_q_kvar):
                loads.idx = at[name]
                loads.kW = float(p)
                loads.kvar = float(q)
            self.engine.solve()
            return {"method": "given", "converged": est.converged}
        self.engine.solve()
        return {"method": "model_power_flow", "converged": True}

    def _with_ders(self, meas: Measurements, p_node: np.ndarray, q_node: np.ndarray
                   ) -> Measurements:
        """The DER node loads join the state with their telemetry as tight pseudo values
        (sigma ``der_sigma_frac`` x |value|, at least ``der_sigma_min_kw``): the estimator's
        load Jacobian needs every load element in the state (unestimated loads break
        ``se_jacobian._load_injections``), and telemetry is a measurement anyway."""
        cfg = self.config
        names = self._der_load_names
        if set(names) & {str(s).lower().removeprefix("load.") for s in meas.load_names}:
            raise InputError("measurements name the cycle's own DER loads")

        def sig(given, x):
            base = (np.maximum(DEFAULT_PSEUDO_SIGMA_FRAC * np.abs(x), DEFAULT_PSEUDO_SIGMA_MIN)
                    if given is None else np.asarray(given, dtype=float))
            return base

        return replace(
            meas, ami_p_kw=self._net_of_ders(meas.ami_p_loads, meas.ami_p_kw, p_node),
            ami_q_kvar=self._net_of_ders(meas.ami_q_loads, meas.ami_q_kvar, q_node),
            load_names=[*meas.load_names, *names],
            telemetry_loads=[*meas.telemetry_loads, *names],
            load_p_kw=np.r_[meas.load_p_kw, p_node], load_q_kvar=np.r_[meas.load_q_kvar, q_node],
            load_p_sigma_kw=np.r_[sig(meas.load_p_sigma_kw, meas.load_p_kw), np.maximum(
                cfg.der_sigma_frac * np.abs(p_node), cfg.der_sigma_min_kw)],
            load_q_sigma_kvar=np.r_[sig(meas.load_q_sigma_kvar, meas.load_q_kvar), np.maximum(
                cfg.der_sigma_frac * np.abs(q_node), cfg.der_sigma_min_kw)])

    def _net_of_ders(self, loads, z, x_node: np.ndarray):
        """An AMI reading is the service point's net power: the customer load plus the
        DERs behind the meter. Those DERs are loads of their own here (their telemetry),
        so the customer load's measurement is the reading less the DER power at its bus
        (taken whole, the DERs counted twice: an EV charging 8 kW read as 8 kW more
        customer load, a PV exporting as less)."""
        if z is None or not len(loads) or not x_node.size:
            return z
        at_bus: dict[str, float] = {}
        for b, x in zip(self._der_node_bus, x_node):
            at_bus[b] = at_bus.get(b, 0.0) + float(x)
        bus = [self._load_bus.get(str(n).strip().lower().removeprefix("load."), "")
               for n in loads]
        return np.asarray(z, dtype=float) - np.array([at_bus.get(b, 0.0) for b in bus])

    def _read_state(self) -> tuple[np.ndarray, np.ndarray]:
        col = StepCollector(self.engine, self.index, 1)
        col.collect(0)
        return col.v_pu[0].astype(float), col.i_a[0].astype(float)

    def _possible_thermal(self, i_a: np.ndarray, notes: list[str]
                          ) -> tuple[list[dict] | None, np.ndarray | None]:
        """Rows within the estimate's uncertainty of their limit (``possible_from_frac``
        of it or more, not over it): their posterior spread and the probability of being
        over (:mod:`derms.analysis.se_posterior`), reported; with ``act_probability``,
        also the margin ``z sd`` [A] per row that the cycle adds to its currents (a
        chance constraint). (None, None) without a state estimate this cycle."""
        post = self._posterior
        if post is None:
            return None, None
        cfg, lim = self.config, self.config.limits
        act = cfg.act_probability
        th_frac = 1 + lim.thermal_tol_pct / lim.thermal_pct
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(np.isfinite(self.i_max), i_a / self.i_max, np.nan)
        # (pre-existing rows are held to their base case at the same estimated load: its
        # uncertainty is common to both, so they get no spread)
        cand = np.flatnonzero(np.isfinite(rel) & (rel >= cfg.possible_from_frac)
                              & (rel <= th_frac) & ~self.i_pre)
        margin = None if act is None else np.zeros_like(i_a)
        if not cand.size:
            return [], margin
        ix = self.index
        out, sd_a, prob = possible_overloads(post, self.sens.m_y[cand], 100 * rel[cand],
                                             self.i_max[cand], 100 * th_frac,
                                             (ix.branch_element[cand], ix.branch_phase[cand]),
                                             cfg.possible_probability)
        if out:
            notes.append(describe_possible(out, "row(s)")
                         + ("" if act else "; not acted on"))
        if margin is not None:
            margin[cand] = max(float(ndtri(1.0 - act)), 0.0) * np.nan_to_num(sd_a)
            n_act = int((prob > act).sum())
            if n_act:
                notes.append(f"{n_act} row(s) held to a {100 * act:g} % chance of being over "
                             "their limit (the estimate plus its spread)")
        return out, margin

    def _detect(self, v: np.ndarray, i_a: np.ndarray) -> dict[str, Any]:
        cfg, lim = self.config, self.config.limits
        live = self.phase_node & (v >= lim.energised_min_pu)
        over = live & (v > self.v_max + lim.v_tol_pu)
        under = live & (v < self.v_min - lim.v_tol_pu)
        th_frac = 1 + lim.thermal_tol_pct / lim.thermal_pct
        thermal = i_a > self.i_max * th_frac
        v_eff, i_eff = v.copy(), i_a.copy()
        imm_v, imm_i = np.zeros_like(live), np.zeros_like(thermal)
        self._history.append((v, i_a))
        if len(self._history) >= max(2, cfg.trend_cycles):
            hv = np.stack([h[0] for h in self._history])
            hi = np.stack([h[1] for h in self._history])
            k = hv.shape[0] - 1
            for h, now_, eff, is_v in ((hv, v, v_eff, True), (hi, i_a, i_eff, False)):
                d = np.diff(h, axis=0)
                mono = (d > 0).all(axis=0) | (d < 0).all(axis=0)
                proj = now_ + np.where(mono, (h[-1] - h[0]) / k, 0.0) * cfg.lead_cycles
                if is_v:
                    up = live & mono & (proj > self.v_max) & ~over & (proj > v)
                    dn = live & mono & (proj < self.v_min) & ~under & (proj < v)
                    imm_v = up | dn
                    eff[imm_v] = proj[imm_v]
                else:
                    imm_i = mono & (proj > self.i_max) & ~thermal & (proj > i_a)
                    eff[imm_i] = proj[imm_i]
        near_v = live & ((v_eff > self.v_max - cfg.near_v_pu)
                         | (v_eff < self.v_min + cfg.near_v_pu))
        near_i = np.isfinite(self.i_max) & (i_eff > self.i_max * (1 - cfg.near_i_frac))
        # worst first: distance beyond (or to) the nearer limit, in units of the near band
        dist_v = np.maximum(v_eff - self.v_max, self.v_min - v_eff) / cfg.near_v_pu
        with np.errstate(invalid="ignore"):
            dist_i = (i_eff / self.i_max - 1) / cfg.near_i_frac
        v_rows = _worst(np.flatnonzero(near_v), dist_v, cfg.max_v_rows)
        i_rows = _worst(np.flatnonzero(near_i), dist_i, cfg.max_i_rows)
        bad_v_mask, bad_i_mask = over | under | imm_v, thermal | imm_i
        bad_v, bad_i = np.flatnonzero(bad_v_mask), np.flatnonzero(bad_i_mask)
        labels = ([str(self.node_names[k]) for k in bad_v[:50]]
                  + [str(self.branch_labels[k]) for k in bad_i[:50]])
        return {"trigger": bool(bad_v.size or bad_i.size),
                "counts": {"overvoltage": int(over.sum()), "undervoltage": int(under.sum()),
                           "thermal": int(thermal.sum())},
                "imminent": int(imm_v.sum() + imm_i.sum()), "violated_labels": labels,
                "v_rows": v_rows, "i_rows": i_rows, "v_eff": v_eff, "i_eff": i_eff,
                "bad_v": bad_v_mask, "bad_i": bad_i_mask,
                "n_rows": int(v_rows.size + i_rows.size)}

    def _correct(self, det: dict, ders: DerState, tm: dict, notes: list[str]
                 ) -> tuple[CorrectiveResult, dict[str, Any]]:
        """LP on the selected rows, then the model's AC solve with the new setpoints; rows
        that solve finds beyond a limit (+ tolerance) join and the LP runs again (at most
        ``ac_rounds`` AC solves). Sensitivities stay those of the estimate."""
        cfg, lim = self.config, self.config.limits
        t = time.perf_counter()
        self.sens.linearise(self.engine)
        tm["sensitivity_s"] += time.perf_counter() - t
        vn, bi = det["v_rows"], det["i_rows"]
        ac: dict[str, Any] = {"rounds": 0}
        result = None
        for _ in range(max(1, cfg.ac_rounds)):
            t = time.perf_counter()
            _, dvp, dvq, _, dip, diq = self.sens.rows(vn, bi)
            vr = VoltageRows(self.node_names[vn], det["v_eff"][vn], self.v_min[vn],
                             self.v_max[vn], dvp, dvq, self.v_pre[vn], det["bad_v"][vn])
            ir = CurrentRows(self.branch_labels[bi], det["i_eff"][bi], self.i_max[bi], dip, diq,
                             self.i_pre[bi], det["bad_i"][bi])
            tm["sensitivity_s"] += time.perf_counter() - t
            t = time.perf_counter()
            result = solve_corrective(ders, vr, ir, cfg.corrective)
            tm["lp_s"] += time.perf_counter() - t
            if cfg.ac_rounds <= 0 or not result.moved.any():
                break
            t = time.perf_counter()
            self._write_der_loads(result.p_kw, result.q_kvar)
            self.engine.solve()
            v, i_a = self._read_state()
            if self._i_margin is not None:  # the same chance constraint as detected
                i_a = i_a + self._i_margin
            ac["rounds"] += 1
            live = self.phase_node & (v >= lim.energised_min_pu)
            bad_v = live & ((v > self.v_max + lim.v_tol_pu) | (v < self.v_min - lim.v_tol_pu))
            bad_i = i_a > self.i_max * (1 + lim.thermal_tol_pct / lim.thermal_pct)
            ac.update(overvoltage=int((live & (v > self.v_max + lim.v_tol_pu)).sum()),
                      undervoltage=int((live & (v < self.v_min - lim.v_tol_pu)).sum()),
                      thermal=int(bad_i.sum()))
            new_v = np.setdiff1d(np.flatnonzero(bad_v), vn)
            new_i = np.setdiff1d(np.flatnonzero(bad_i), bi)
            tm["ac_check_s"] += time.perf_counter() - t
            if new_v.size == 0 and new_i.size == 0:
                break  # what remains (if anything) is already a row: reported by the LP
            vn, bi = np.union1d(vn, new_v), np.union1d(bi, new_i)
        notes += result.notes
        if ac.get("overvoltage", 0) + ac.get("undervoltage", 0) + ac.get("thermal", 0):
            notes.append(f"model AC check after {ac['rounds']} round(s) still shows "
                         f"{ac['overvoltage']} over-, {ac['undervoltage']} undervoltage and "
                         f"{ac['thermal']} thermal violation(s)")
        return result, ac

    def _candidates(self, active) -> set[int]:
        """Registry positions of the DERs the requests ``active`` cover."""
        cand: set[int] = set()
        for r in active:
            s = r.scope
            if s.kind is ScopeKind.DEVICE:
                if s.der_id in self._pos:
                    cand.add(self._pos[s.der_id])
            elif s.kind is ScopeKind.CONNECTION_POINT:
                cand.update(np.flatnonzero(self._cp == s.connection_point).tolist())
            elif s.kind is ScopeKind.FEEDER:
                cand.update(np.flatnonzero(self._feeder == s.feeder_id).tolist())
            else:
                cand.update(np.flatnonzero((self._feeder == s.feeder_id)
                                           & np.isin(self._bus, list(s.buses))).tolist())
        return cand

    def _authority(self, now: datetime, cycle_id: str, notes: list[str]
                   ) -> list[DeviceCommand]:
        """Commands that carry out a higher authority's decisions on the devices, every
        cycle: an operator's or the ADMS's setpoint goes out as a setpoint, a device-level
        limit (export, import) as a limit unless the DERMS's own command in force is
        already within it, a blocked device without such a limit is released from the
        DERMS's own command (an event with no modes: its default control applies); each
        valid until its request ends. A device whose authority request has ended early
        (withdrawn) is released at once. Ids are the cycle's "/auth" ids, apart from the
        corrective step's. (The decisions used to only keep the corrective step from
        moving the device: an operator setpoint read "applied" and never reached it, a
        block left the DERMS's earlier command running.)"""
        if self.arbiter is None:
            return []
        auth_cycle = f"{cycle_id}/auth"
        out: list[DeviceCommand] = []
        active = self.arbiter.active(now)
        held: dict[str, str] = {}
        for j in sorted(self._candidates(active)):
            der = str(self.registry.der_id[j])
            d = self._decision(j, now)
            last = self._issuer.last.get(der)
            own = (last is not None and last.valid_until > now
                   and not last.reason.startswith("authority"))
            cmds: list[DeviceCommand | None] = []
            if d.setpoint_kw is not None and not d.blocked and \
                    self.arbiter.get(d.setpoint_by).source is not Source.OPTIMISATION:
                req = self.arbiter.get(d.setpoint_by)
                held[der] = req.request_id
                cmds.append(self._issuer.issue_as(
                    now, auth_cycle, der, CommandMode.P_SETPOINT, d.setpoint_kw, req.end,
                    f"authority: {req.source.value} setpoint ({req.request_id})"))
            else:
                for lim in d.limits:
                    if lim.scope_kind is not ScopeKind.DEVICE:
                        continue
                    mode, p = ((CommandMode.EXPORT_LIMIT, -abs(lim.value_kw))
                               if lim.kind is CommandKind.LIMIT_EXPORT else
                               (CommandMode.IMPORT_LIMIT, abs(lim.value_kw)))
                    held[der] = lim.request_id
                    if own and _within(last, mode, p):
                        continue  # the DERMS's own command already keeps the limit
                    cmds.append(self._issuer.issue_as(
                        now, auth_cycle, der, mode, p, self.arbiter.get(lim.request_id).end,
                        f"authority: {lim.kind.value} {lim.value_kw:g} kW "
                        f"({lim.request_id})"))
                if d.blocked and der not in held:
                    held[der] = d.blocked_by
                    if own:
                        cmds.append(self._issuer.issue_as(
                            now, auth_cycle, der, CommandMode.RELEASE, 0.0,
                            self.arbiter.get(d.blocked_by).end,
                            f"authority: dispatch blocked ({d.blocked_by})"))
            out += [c for c in cmds if c is not None]
        # authority commands whose request has ended early (withdrawn): release them now
        if self._auth_ders is None:
            self._auth_ders = {d for d, c in self._issuer.last.items()
                               if c.reason.startswith("authority")}
        for der in sorted(self._auth_ders - held.keys()):
            cmd = self._issuer.last.get(der)
            if (cmd is not None and cmd.reason.startswith("authority")
                    and cmd.mode is not CommandMode.RELEASE and cmd.valid_until > now):
                rel = self._issuer.issue_as(
                    now, auth_cycle, der, CommandMode.RELEASE, 0.0,
                    now + timedelta(seconds=2 * self.config.period_s),
                    "authority: request ended (withdrawn)")
                if rel is not None:
                    out.append(rel)
        self._auth_ders = set(held) | {c.der_id for c in out}
        if out:
            notes.append(f"authority: {len(out)} command(s) carrying out operator/ADMS "
                         "decisions (setpoints, limits, releases)")
        return out

    def _decision(self, j: int, now: datetime):
        """The arbiter's decision for registry position ``j`` at ``now`` (once per cycle)."""
        key = (now, id(self.arbiter))
        if self._decided[0] != key:
            self._decided = (key, {})
        cache = self._decided[1]
        if j not in cache:
            cache[j] = self.arbiter.resolve(self._locs[j], now)
        return cache[j]

    def _arbitrate(self, now: datetime, f: dict) -> tuple[np.ndarray, ...]:
        n = f["p_kw"].size
        fixed = np.zeros(n, dtype=bool)
        p_lo, p_hi = f["p_min_kw"].copy(), f["p_max_kw"].copy()
        notes: list[str] = []
        if self.arbiter is None:
            return fixed, p_lo, p_hi, notes
        cand = self._candidates(self.arbiter.active(now))
        blocked = held = 0
        for j in sorted(cand):
            d = self._decision(j, now)
            if d.blocked:
                fixed[j] = True
                blocked += 1
                continue
            if d.setpoint_kw is not None and \
                    self.arbiter.get(d.setpoint_by).source is not Source.OPTIMISATION:
                fixed[j] = True  # a higher authority holds it
                held += 1
                continue
            e = d.limit(CommandKind.LIMIT_EXPORT, ScopeKind.DEVICE)
            m = d.limit(CommandKind.LIMIT_IMPORT, ScopeKind.DEVICE)
            if e is not None:
                p_lo[j] = min(max(p_lo[j], -e), p_hi[j])
            if m is not None:
                p_hi[j] = max(min(p_hi[j], m), p_lo[j])
        if blocked or held:
            notes.append(f"arbiter: {blocked} DER(s) blocked, {held} held by a higher "
                         "authority's setpoint: not moved, no command")
        return fixed, p_lo, p_hi, notes


def _within(cmd: DeviceCommand, mode: CommandMode, p_kw: float) -> bool:
    """Whether ``cmd`` already keeps a device inside the limit ``mode``/``p_kw`` (an
    export limit -e: a setpoint or export limit at or above -e; an import limit m: a
    setpoint or import limit at or below m)."""
    if mode is CommandMode.EXPORT_LIMIT:
        return cmd.mode in (CommandMode.P_SETPOINT, CommandMode.EXPORT_LIMIT) and \
            cmd.p_kw >= p_kw - 1e-9
    return cmd.mode in (CommandMode.P_SETPOINT, CommandMode.IMPORT_LIMIT) and \
        cmd.p_kw <= p_kw + 1e-9


def _worst(idx: np.ndarray, dist: np.ndarray, cap: int) -> np.ndarray:
    if idx.size <= cap:
        return idx
    return np.sort(idx[np.argsort(-dist[idx], kind="stable")[:cap]])


__all__ = ["STAGES", "CycleReport", "DerRegistry", "FastCycle", "FastCycleConfig", "FleetNow"]
