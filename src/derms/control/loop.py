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

Modules: this one holds the service (construction, thread, status); building and
rebuilding (step 1, the DER registry, restart) is :mod:`derms.control.loop_build`, one
cycle (steps 2-8) :mod:`derms.control.loop_cycle`, the re-plan (step 9)
:mod:`derms.control.loop_replan`, each a mixin of :class:`ControlLoop`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from derms.control.commands import CommandIssuer, InMemorySink
from derms.control.fast_cycle import CycleReport, FastCycle
from derms.control.loop_build import BuildMixin, LoopDer
from derms.control.loop_config import (
    DefaultControlConfig,
    LoopConfig,
    assign_end_devices,
    ensure_control_program,
)
from derms.control.loop_cycle import CycleMixin
from derms.control.loop_measurements import StoreMeasurements
from derms.control.loop_replan import ReplanMixin
from derms.control.replan import Replanner, ReplanResult
from derms.control.sep_sink import SepCommandSink
from derms.control.state import ControlState
from derms.control.tracking import CommandTracker, TrackingSink
from derms.errors import DermsError
from derms.monitoring.background import BackgroundLoop
from derms.monitoring.cycle import RunError
from derms.monitoring.state import FeederState
from derms.store.db import make_session_factory
from derms.store.types import utcnow

log = logging.getLogger(__name__)


class ControlLoop(CycleMixin, BuildMixin, ReplanMixin, BackgroundLoop):
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
        self._ders: list[LoopDer] = []
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

    # -- state and status for the API ---------------------------------------------------
    def latest_state(self, feeder_id: str) -> FeederState | None:
        """The state of the last cycle that estimated one (None for another feeder)."""
        return self.state if feeder_id == self.feeder_id else None

    def latest_state_error(self, feeder_id: str) -> RunError | None:
        """Why cycles since :meth:`latest_state` made no estimate (None: none failed)."""
        return self.state_error if feeder_id == self.feeder_id else None

    def status(self) -> dict[str, Any]:
        """The loop's status and its last cycle and re-plan (``GET /v1/control/loop``)."""
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


__all__ = ["ControlLoop", "DefaultControlConfig", "LoopConfig", "assign_end_devices",
           "ensure_control_program"]
