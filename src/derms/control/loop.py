"""The control loop as a service: :class:`~derms.control.fast_cycle.FastCycle` on one
feeder every ``period_s`` (default 5 s), fed from the store, commands tracked.

Each :meth:`ControlLoop.run_once` at ``now``:

1. **Model.** Built on first use and rebuilt when the feeder's topology changes (a new
   ``TopologyEvent`` with ``t <= now``, e.g. ADMS switching) or its DER set changes: the
   feeder's OpenDSS master (its latest ``FeederModelVersion``, as monitoring finds it, or
   the ``master`` given: a path or a bundled name) compiled, controls settled once and
   frozen, the latest switch states applied, then the DER registry from the store (below)
   and a new FastCycle that keeps the loop's :class:`CommandIssuer` (so standing
   decisions keep their ids). The report says when topology was reloaded and from which
   event (``topology_reloaded``).
2. **IEEE 2030.5** (when a repository is given): the "derms control" program and its
   function set assignment (FSA) exist, every end device with a ``der_id`` is assigned to
   it, the program has its fail-safe :class:`DefaultControlConfig`; responses become
   acknowledgements (:meth:`CommandTracker.take_responses`).
3. **DER telemetry**: each DER's latest ``p_kw`` (and ``q_kvar``), any source, import
   positive at the device. Older than ``stale_after_s`` (or none): *stale* — the DER is
   held at its last value (0 without one), never commanded, and listed in the report.
4. **Delivery**: open commands verified against that telemetry, scores and escalation
   (:mod:`derms.control.tracking`); escalated DERs are held too.
5. **Arbiter** rebuilt from the store (:class:`~derms.control.state.ControlState`: expiries
   recorded and audited, open requests loaded).
6. **Measurements** for the estimator, read as :class:`~derms.monitoring.FeederMonitor`
   reads them (AMI voltages and power, head SCADA, pseudo-loads; through a thin adapter
   over its methods). No fresh meter reading and no fresh DER telemetry on the feeder:
   *no action* this cycle (status ``no_telemetry``, noted).
7. **FastCycle.run**; its commands go through a :class:`TrackingSink` (stored and audited,
   then handed to the protocol sink: :class:`SepCommandSink` with a repository, else an
   :class:`InMemorySink`).
8. The cycle summary is kept for the API and written to the audit log (``entity="feeder"``,
   ``action="control_cycle"``) unless the cycle is quiet (clear, nothing issued, verified,
   held or noted, as the cycle before). The cycle's state estimate is kept as a
   :class:`~derms.monitoring.FeederState` (:mod:`derms.control.loop_state`):
   :meth:`ControlLoop.latest_state` / :meth:`ControlLoop.latest_state_error`, what
   ``GET /v1/feeders/{id}/state`` serves when no monitoring cycle has a state for the
   feeder; a cycle without an estimate records an error there (the state turns stale).

9. **Re-plan** (``LoopConfig.replan``, off when None): every ``replan.period_s`` (default
   900 s; the first one period after the start) on the loop's thread, between fast
   cycles (which wait for it), :meth:`ControlLoop.run_replan` plans
   the next hours from forecasts (:mod:`derms.control.replan`; its own engine, compiled
   and closed within the run) and issues the plan's present interval through the same
   tracking sink and issuer; a fast-cycle command stands over the plan (precedence in
   that module). Its summary is ``status()["last_replan"]`` and audited
   (``action="control_replan"``); a failed re-plan is recorded there and the fast cycle
   goes on.

DER registry: the store's devices on the feeder's sites (not decommissioned; not active →
held); injection nodes from the device's bus (else its site's) and phase (``a`` →
``bus.1`` …, ``abc`` → the bus's nodes), power shared equally among them; kind from
``der_type``. Ranges (net import, kW) from the nameplate and the measurement: PV and wind
``[p, 0]`` (curtail only: the sun is not metered), battery ``[-p_gen_max, p_charge_max]``,
EV charger and flexible load ``[0, p]`` (reduce only), generator ``[-p_gen_max, 0]``,
others fixed. Reactive power is not dispatched (the IEEE 2030.5 sink does not express it).

Restart: :meth:`ControlLoop.build` seeds the issuer with the tracked commands still valid
(:meth:`CommandTracker.standing`), so a decision that stands is not re-issued under a new
id, and sends commands stored but never sent (a crash in between) if still valid; commands
whose validity has passed are never sent again. Cycle ids carry a per-run tag, so ids of
a new run never collide with an old run's.

Threads: :meth:`start` runs the loop on its own thread, which builds, uses and closes every
OpenDSS engine of the loop (see docs/ARCHITECTURE.md on dss-python and threads); tests call
:meth:`run_once` on their own thread instead.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from derms.control.commands import CommandIssuer, InMemorySink
from derms.control.fast_cycle import CycleReport, DerRegistry, FastCycle, FleetNow
from derms.control.loop_config import (
    DefaultControlConfig,
    LoopConfig,
    assign_end_devices,
    ensure_control_program,
)
from derms.control.loop_measurements import StoreMeasurements
from derms.control.loop_replan import ReplanMixin, jsonable
from derms.control.loop_state import cycle_state
from derms.control.replan import Replanner, ReplanResult
from derms.control.requests import DeviceLocation
from derms.control.sep_sink import SepCommandSink
from derms.control.state import ControlState
from derms.control.tracking import CommandTracker, TrackingSink
from derms.errors import DermsError, InputError
from derms.grid.bundled import resolve_master
from derms.grid.elements import bus_of
from derms.monitoring.background import BackgroundLoop
from derms.monitoring.cycle import (
    RunError,
    model_path_of,
    model_version_of,
    sync_version_placement,
)
from derms.monitoring.feeder_monitor import (
    PHASE_NODE,
)
from derms.monitoring.state import FeederState
from derms.monitoring.telemetry import latest_readings, series_of
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from derms.powerflow.voltage_measure import delta_terms
from derms.store.audit import append_audit
from derms.store.db import make_session_factory
from derms.store.models import DerDevice, DerSite, DerType, DeviceStatus, TopologyEvent
from derms.store.types import ensure_utc, utcnow

log = logging.getLogger(__name__)
KIND = {DerType.PV: "pv", DerType.WIND: "wind", DerType.BATTERY: "battery",
        DerType.EV_CHARGER: "ev", DerType.FLEXIBLE_LOAD: "flexible_load",
        DerType.GENERATOR: "generator", DerType.OTHER: "other"}


@dataclass
class _Der:
    der_id: str
    kind: str
    nodes: tuple[str, ...]
    bus: str
    site_id: str
    active: bool
    p_gen_max_kw: float
    p_charge_max_kw: float
    rating_kw: float


class ControlLoop(ReplanMixin, BackgroundLoop):
    """The control loop of one feeder (module docstring).

    Parameters
    ----------
    db : sqlalchemy Engine
        The store (devices, telemetry, requests, topology, tracked commands, audit).
    feeder_id : str
    master : path or bundled name, optional
        The feeder's OpenDSS master; default: its registered ``FeederModelVersion``.
    repo : SepAdminRepository, optional
        The IEEE 2030.5 server's repository: commands become DERControls of the
        "derms control" program; without it (and without ``sink``) an in-memory sink.
    sink : CommandSink, optional
    config : LoopConfig, optional
    clock : callable returning an aware UTC time (tests pass their own)
    """

    thread_name = "derms-control"

    def __init__(self, db: Engine, feeder_id: str, *, master: str | Path | None = None,
                 repo=None, sink=None, config: LoopConfig | None = None,
                 clock: Callable[[], datetime] = utcnow, actor: str = "control-loop") -> None:
        super().__init__()
        self.db, self.feeder_id, self.master = db, feeder_id, master
        self.config = cfg = config or LoopConfig()
        self.clock, self.actor = clock, actor
        self.sessions = make_session_factory(db)
        self.tracker = CommandTracker(self.sessions, feeder_id,
                                      replace(cfg.tracking, period_s=cfg.period_s), actor=actor)
        self.control_state = ControlState(self.sessions, actor="arbiter")
        self.fast_config = replace(cfg.fast, period_s=cfg.period_s)
        self._issuer = CommandIssuer(self.fast_config.hold_s, cfg.period_s,
                                     self.fast_config.deadband_kw)
        self.repo = repo
        self.program_id = self.fsa_id = None
        if repo is not None:
            self.program_id, self.fsa_id = ensure_control_program(repo, cfg)
            inner = SepCommandSink(repo, self.program_id, cfg.program_description)
            self._repo_version = repo.version
        else:
            inner = sink if sink is not None else InMemorySink()
        self.inner_sink = inner
        self.sink = TrackingSink(self.tracker, inner)
        self.run_tag = uuid.uuid4().hex[:6]
        self._cycle: FastCycle | None = None
        self._meas: StoreMeasurements | None = None
        self._ders: list[_Der] = []
        self._built_key: tuple | None = None
        self._topology_mark: tuple | None = None
        self._model_version: int | None = None  # the version the cycle was built on
        self._topology_reload: dict[str, Any] | None = None
        self._started = False
        self._last_quiet: tuple | None = None
        self._topology_pending = False
        self.cycles = 0
        self.last_summary: dict[str, Any] | None = None
        self.last_report: CycleReport | None = None
        self.last_error: dict[str, Any] | None = None
        # the last cycle's state estimate for the API, and why a later cycle had none
        self.state: FeederState | None = None
        self.state_error: RunError | None = None
        self.replanner: Replanner | None = None
        self.last_replan: dict[str, Any] | None = None
        self.last_replan_result: ReplanResult | None = None
        self.replans = 0

    # -- building -----------------------------------------------------------------------
    def _master_path(self, now: datetime) -> Path:
        if self.master is not None:
            return resolve_master(self.master).resolve()
        path = model_path_of(self.db, self.feeder_id, now)
        if path is None:
            raise InputError(f"feeder {self.feeder_id!r}: no OpenDSS model version registered")
        return path

    def _version_in_force(self, now: datetime) -> int | None:
        """The feeder's model version in force at ``now`` (None with a fixed ``master``):
        a version registered for later makes the loop rebuild when it comes into force."""
        if self.master is not None:
            return None
        found = model_version_of(self.db, self.feeder_id, now)
        return None if found is None else found[1]

    def _topology_marker(self, now: datetime) -> tuple:
        with self.db.connect() as conn:
            row = conn.execute(select(func.count(TopologyEvent.id), func.max(TopologyEvent.id))
                               .where(TopologyEvent.feeder_id == self.feeder_id,
                                      TopologyEvent.t <= now)).one()
        return (int(row[0]), row[1])

    def _load_ders(self) -> list[tuple]:
        with self.db.connect() as conn:
            rows = conn.execute(
                select(DerDevice.der_id, DerDevice.der_type, DerDevice.phase, DerDevice.bus,
                       DerSite.bus, DerSite.site_id, DerDevice.status, DerDevice.p_gen_max_kw,
                       DerDevice.p_charge_max_kw, DerDevice.s_max_kva)
                .join(DerSite, DerDevice.site_id == DerSite.site_id)
                .where(DerSite.feeder_id == self.feeder_id,
                       DerDevice.status != DeviceStatus.DECOMMISSIONED)
                .order_by(DerDevice.der_id)).all()
        return [tuple(r) for r in rows]

    def build(self, now: datetime | None = None) -> dict[str, Any] | None:
        """(Re)build the model, registry and FastCycle at ``now`` (module docstring); on
        the first build, seed the issuer from the tracked commands and send those stored
        but never sent. Returns the topology reload record when the topology changed
        since the previous build (else None)."""
        now = ensure_utc(now or self.clock(), "now")
        rows = self._load_ders()
        mark = self._topology_marker(now)
        found = None if self.master is not None else model_version_of(self.db,
                                                                       self.feeder_id, now)
        version = None if found is None else found[1]
        if version is not None and version != self._model_version:
            # its placement alarms (a version registered for later was not checked then)
            sync_version_placement(self.db, self.feeder_id, version)
        self._close_engine()
        master = self._master_path(now) if found is None else found[0]  # (one lookup)
        engine = OpenDSSEngine(master, SolveSettings(tolerance=1e-6))
        try:
            engine.solve_snapshot()  # controls settle once on the base case, then freeze
            engine.set_control_mode("off")
            engine.solve_snapshot()
            meas = StoreMeasurements(self.feeder_id, engine, self.db, self.config.monitor)
            notes: list[str] = []
            meas._apply_topology(now, notes)
            names = engine.node_names()
            ungrounded = {n.split(".")[0] for n, q in zip(names, engine.voltage_pairs(),
                                                          strict=True) if q >= 0}
            ders, skipped = self._registry_rows(rows, set(names), ungrounded)
            if not ders:
                raise InputError(f"feeder {self.feeder_id!r}: no DER device on it maps to "
                                 f"the model (skipped: {skipped[:10]})")
            points = sorted({d.nodes for d in ders})
            at = {p: k for k, p in enumerate(points)}
            registry = DerRegistry(
                np.array([d.der_id for d in ders]), np.array([d.kind for d in ders]),
                np.array([at[d.nodes] for d in ders]), points,
                [DeviceLocation(d.der_id, feeder_id=self.feeder_id, bus=d.bus,
                                connection_point=d.site_id) for d in ders])
            cycle = FastCycle(engine, registry, self.sink, config=self.fast_config,
                              pre_existing=self.config.pre_existing,  # type: ignore[arg-type]
                              feeder_id=self.feeder_id, issuer=self._issuer,
                              cycle_tag=f"{self.run_tag}-")
        except BaseException:
            engine.close()
            raise
        self._cycle, self._meas, self._ders = cycle, meas, ders
        self._built_key, self._skipped = tuple(rows), skipped
        reload = None
        if self._topology_mark is not None and mark != self._topology_mark:
            self._topology_reload = {"t": now.isoformat(), "event_id": mark[1],
                                     "switches": dict(meas.topology), "notes": notes}
            with self.sessions.begin() as s:
                append_audit(s, actor=self.actor, action="control_topology_reload",
                             entity="feeder", entity_id=self.feeder_id,
                             detail=self._topology_reload, t=now)
            reload = self._topology_reload
        self._topology_mark = mark
        self._model_version = version
        if not self._started:
            self._started = True
            standing = self.tracker.standing(now)
            self._issuer.seed(standing, now)
            unsent = self.tracker.unsent(now)
            if unsent:
                self.inner_sink.send(unsent)
                unmatched = set(getattr(self.inner_sink, "unmatched", ()) or ())
                self.tracker.mark_sent([c.command_id for c in unsent
                                        if c.der_id not in unmatched], now)
            log.info("event=control_loop_built feeder=%s ders=%d standing=%d resent=%d",
                     self.feeder_id, len(ders), len(standing), len(unsent))
        return reload

    def _registry_rows(self, rows: list[tuple], nodes: set[str], ungrounded: set[str] = frozenset()
                       ) -> tuple[list[_Der], list[str]]:
        """The DERs that map to the model, with their injection terms: phase nodes, or on
        an ungrounded (3-wire) bus the node pairs between them (line to line)."""
        out, skipped = [], []
        for der_id, dtype, phase, dev_bus, site_bus, site_id, status, gmax, cmax, smax in rows:
            bus = bus_of(dev_bus or site_bus or "")  # "671.1.2" -> "671"
            letters = str(getattr(phase, "value", phase) or "abc")
            pts = tuple(f"{bus}.{PHASE_NODE[x]}" for x in letters
                        if f"{bus}.{PHASE_NODE[x]}" in nodes)
            if bus in ungrounded and len(pts) >= 2:
                ph = [int(t.rsplit(".", 1)[1]) for t in pts]
                pts = tuple(delta_terms(bus, ph, max(len(ph), 3)))
            if not bus or not pts or (bus in ungrounded and len(pts) == 1
                                      and pts[0].count(".") == 1):
                skipped.append(der_id)  # one phase to ground on a 3-wire feeder: no model
                continue
            out.append(_Der(der_id, KIND.get(DerType(dtype), "other"), pts, bus, site_id,
                            DeviceStatus(status) is DeviceStatus.ACTIVE, float(gmax or 0),
                            float(cmax or 0), float(max(gmax or 0, cmax or 0, smax or 0))))
        return out, skipped

    def _close_engine(self) -> None:
        if self._cycle is not None:
            self._cycle.engine.close()
            self._cycle = self._meas = None

    def close(self) -> None:
        """Stop the thread (which closes its engine); close an engine built by run_once."""
        self.stop()
        self._close_engine()

    def notify_topology_change(self, feeder_id: str | None = None) -> None:
        """Run a cycle now (the topology is re-read at every cycle anyway)."""
        if feeder_id is None or feeder_id == self.feeder_id:
            with self._cond:
                self._topology_pending = True
                self._cond.notify_all()

    # -- one cycle ----------------------------------------------------------------------
    def _telemetry(self, now: datetime) -> dict[str, tuple[datetime, float, float]]:
        ids = [d.der_id for d in self._ders]
        start = now - timedelta(seconds=self.config.lookback_s)
        with self.db.connect() as conn:
            ser = series_of(conn, der_ids=ids, quantities=("p_kw", "q_kvar"))
            last = latest_readings(conn, ser["series_id"].tolist(), start, now)
        last = last.merge(ser, on="series_id").sort_values("t")
        out: dict[str, tuple[datetime, float, float]] = {}
        p = last[last["quantity"] == "p_kw"].groupby("der_id").tail(1)
        q = last[last["quantity"] == "q_kvar"].groupby("der_id").tail(1).set_index("der_id")
        for r in p.itertuples(index=False):
            qv = float(q.loc[r.der_id, "value"]) if r.der_id in q.index else 0.0
            out[r.der_id] = (r.t, float(r.value), qv)
        return out

    def _fleet(self, now: datetime, tel: dict, scores: np.ndarray, escalated: set[str]
               ) -> tuple[FleetNow, list[str]]:
        n = len(self._ders)
        p, q = np.zeros(n), np.zeros(n)
        lo, hi, fixed = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
        stale = []
        for j, d in enumerate(self._ders):
            m = tel.get(d.der_id)
            if m is not None:
                p[j], q[j] = m[1], m[2]
            if m is None or (now - m[0]).total_seconds() > self.config.stale_after_s:
                stale.append(d.der_id)
                fixed[j] = True
            if not d.active or d.der_id in escalated:
                fixed[j] = True
            if d.kind in ("pv", "wind"):
                lo[j], hi[j] = min(p[j], 0.0), 0.0
            elif d.kind == "battery":
                lo[j], hi[j] = -d.p_gen_max_kw, d.p_charge_max_kw
            elif d.kind in ("ev", "flexible_load"):
                lo[j], hi[j] = 0.0, max(p[j], 0.0)
            elif d.kind == "generator":
                lo[j], hi[j] = -d.p_gen_max_kw, 0.0
            else:
                lo[j] = hi[j] = p[j]
        lo, hi = np.minimum(lo, p), np.maximum(hi, p)
        return FleetNow(p, q, lo, hi, q.copy(), q.copy(), scores, fixed=fixed), stale

    def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """One cycle at ``now`` (module docstring); returns its summary (also kept in
        :attr:`last_summary`)."""
        now = ensure_utc(now or self.clock(), "now")
        t0 = time.perf_counter()
        reload = None
        if (self._cycle is None or self._topology_marker(now) != self._topology_mark
                or tuple(self._load_ders()) != self._built_key
                or self._version_in_force(now) != self._model_version):
            reload = self.build(now)
        acks = 0
        if self.repo is not None:
            if self.repo.version != self._repo_version:
                assign_end_devices(self.repo, self.fsa_id)
                self._repo_version = self.repo.version
            acks = self.tracker.take_responses(self.repo, now)
        tel = self._telemetry(now)
        ids = [d.der_id for d in self._ders]
        ratings = {d.der_id: d.rating_kw for d in self._ders}
        verdicts = self.tracker.verify(now, {k: (v[0], v[1]) for k, v in tel.items()}, ratings)
        scores = self.tracker.scores(ids)
        escalated = self.tracker.escalated(ids, now)
        fleet, stale = self._fleet(now, tel, scores, escalated)
        self.control_state.refresh(now)
        self._cycle.arbiter = self.control_state.arbiter
        notes: list[str] = []
        if stale:
            notes.append(f"{len(stale)} DER(s) with stale or no telemetry (older than "
                         f"{self.config.stale_after_s:.0f} s): held at their last value, "
                         f"not commanded: {stale[:20]}")
        if escalated:
            notes.append(f"{len(escalated)} DER(s) escalated (did not deliver): held at their "
                         f"measured output, others relied upon: {sorted(escalated)[:20]}")
        if self._skipped:
            notes.append(f"DERs not on the model (no bus/phase node): {self._skipped[:20]}")
        meas = self._meas.measurements(now, notes)
        fresh = len(stale) < len(self._ders)
        summary: dict[str, Any] = {
            "feeder_id": self.feeder_id, "t": now.isoformat(), "n_ders": len(self._ders),
            "stale": stale, "escalated": sorted(escalated), "acknowledged": acks,
            "verified": _count(v.state for v in verdicts),
            # scores of the DERs with a delivery history (the others are at the prior)
            "scores": {d: round(float(s), 4) for d, s in zip(ids, scores)
                       if s != self.tracker.config.prior_score},
            "topology_reloaded": reload}
        if meas is None and not fresh:
            notes.append("no fresh telemetry on the feeder (meters or DERs): no action")
            summary.update(cycle_id=None, status="no_telemetry", commands=0, command_ids=[],
                           violations={}, imminent=0, n_rows=0, n_fixed=int(fleet.fixed.sum()),
                           timings={"total_s": time.perf_counter() - t0}, estimation={},
                           ac_check={})
            self.last_report = None
            self.state_error = RunError(now, "no fresh telemetry on the feeder: no estimate")
        else:
            rep = self._cycle.run(now, fleet, measurements=meas)
            self.last_report = rep
            notes += rep.notes
            authority = sum(c.reason.startswith("authority") for c in rep.commands)
            summary.update(
                # dispatch decided by the DERMS; the operator's and ADMS's decisions
                # carried out (setpoints, limits, releases of blocked DERs) apart
                cycle_id=rep.cycle_id, status=rep.status,
                commands=len(rep.commands) - authority, authority_commands=authority,
                command_ids=[c.command_id for c in rep.commands], violations=rep.violations,
                imminent=rep.imminent, violated_rows=rep.violated_rows[:20], n_rows=rep.n_rows,
                n_fixed=rep.n_fixed, timings={**rep.timings,
                                              "loop_total_s": time.perf_counter() - t0},
                estimation=jsonable(rep.estimation), ac_check=jsonable(rep.ac_check))
            self._keep_state(now, rep, tel, summary, notes)
        summary["notes"] = notes
        self._audit_cycle(now, summary, verdicts)
        self.cycles += 1
        self.last_summary = summary
        return summary

    def _keep_state(self, now: datetime, rep: CycleReport, tel: dict, summary: dict,
                    notes: list[str]) -> None:
        """The cycle's estimate as the feeder's state for the API (module docstring)."""
        if rep.v_pu is None or rep.branch_loading_pct is None:
            return
        d = self._ders
        self.state = cycle_state(
            self.feeder_id, now, index=self._cycle.index,
            node_names=self._cycle.node_names.tolist(), v_pu=rep.v_pu,
            branch_loading_pct=rep.branch_loading_pct, limits=self.fast_config.limits,
            der_ids=[x.der_id for x in d], active=[x.active for x in d],
            p_gen_max_kw=[x.p_gen_max_kw for x in d],
            p_charge_max_kw=[x.p_charge_max_kw for x in d], telemetry=tel,
            thresholds=self.config.monitor.availability, estimation=summary["estimation"],
            control={k: summary[k] for k in ("cycle_id", "status", "violations", "imminent",
                                             "commands")},
            topology=self._meas.topology, notes=notes)
        self.state_error = None

    def latest_state(self, feeder_id: str) -> FeederState | None:
        """The state of the last cycle that estimated one (None for another feeder)."""
        return self.state if feeder_id == self.feeder_id else None

    def latest_state_error(self, feeder_id: str) -> RunError | None:
        """Why cycles since :meth:`latest_state` made no estimate (None: none failed)."""
        return self.state_error if feeder_id == self.feeder_id else None

    def _audit_cycle(self, now: datetime, summary: dict, verdicts) -> None:
        key = (summary["status"], tuple(summary["stale"]), tuple(summary["escalated"]))
        quiet = (summary["status"] == "clear" and not summary["commands"]
                 and not summary.get("authority_commands") and not verdicts
                 and not summary["acknowledged"] and not summary["topology_reloaded"])
        if quiet and key == self._last_quiet:
            return
        self._last_quiet = key if quiet else None
        detail = {k: v for k, v in summary.items() if k != "scores"}
        with self.sessions.begin() as s:
            append_audit(s, actor=self.actor, action="control_cycle", entity="feeder",
                         entity_id=self.feeder_id, detail=jsonable(detail), t=now)

    # -- the slow re-plan ---------------------------------------------------------------
    # -- status for the API --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"feeder_id": self.feeder_id, "running": self._thread is not None,
                "period_s": self.config.period_s, "cycles": self.cycles,
                "run_tag": self.run_tag, "n_ders": len(self._ders),
                "ieee2030_5": None if self.repo is None else {
                    "program_id": self.program_id, "fsa_id": self.fsa_id,
                    "default_control": None if self.config.defaults is None else {
                        "export_limit_w": self.config.defaults.export_limit_w,
                        "import_limit_w": self.config.defaults.import_limit_w,
                        "gen_limit_w": self.config.defaults.gen_limit_w,
                        "set_grad_w": self.config.defaults.set_grad_w}},
                "model_version": self._model_version,
                "topology": {"events": None if self._topology_mark is None
                             else self._topology_mark[0],
                             "last_reload": self._topology_reload},
                "last_cycle": self.last_summary, "last_error": self.last_error,
                "replan_period_s": None if self.config.replan is None
                else self.config.replan.period_s,
                "replans": self.replans, "last_replan": self.last_replan}

    # -- thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            next_at = time.monotonic()
            # the first re-plan one period after the start: a start or restart first lets
            # the fast cycle act on present violations and the re-seeded standing commands
            # (a previous plan's too) run out
            replan_at = time.monotonic() + (self.config.replan.period_s
                                            if self.config.replan is not None else 0.0)
            while True:
                with self._cond:
                    while not self._stop and not self._topology_pending \
                            and time.monotonic() < next_at:
                        self._cond.wait(max(0.01, next_at - time.monotonic()))
                    if self._stop:
                        return
                    topology_notice, self._topology_pending = self._topology_pending, False
                next_at = time.monotonic() + self.config.period_s
                try:
                    summary = self.run_once()
                    self.last_error = None
                    if topology_notice and summary.get("topology_reloaded"):
                        replan_at = 0.0  # a new topology: re-plan on it now, not a whole
                        # re-plan period later
                except Exception as exc:  # one bad cycle must not stop the loop
                    error = (f"{type(exc).__name__}: {exc}" if isinstance(exc, DermsError)
                             else type(exc).__name__)
                    if (self.last_error or {}).get("error") != error:  # once per new error
                        log.exception("control_cycle_failed feeder=%s", self.feeder_id)
                    else:
                        log.warning("control_cycle_failed feeder=%s error=%s (again)",
                                    self.feeder_id, error)
                    self.last_error = {"t": utcnow().isoformat(), "error": error}
                    self.state_error = RunError(self.clock(), error)
                if self.config.replan is not None and self._cycle is not None \
                        and time.monotonic() >= replan_at:
                    replan_at = time.monotonic() + self.config.replan.period_s
                    self._replan_guarded()
        finally:
            self._close_engine()  # on the thread that built it


def _count(states) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in states:
        out[s] = out.get(s, 0) + 1
    return out


__all__ = ["ControlLoop", "DefaultControlConfig", "LoopConfig", "assign_end_devices",
           "ensure_control_program"]
