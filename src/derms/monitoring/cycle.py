"""The monitoring cycle: every registered feeder's :meth:`FeederMonitor.run_once` every
``period_s`` in one background thread, and at once after ``notify_topology_change``.

One thread runs every monitor, so each OpenDSS engine is only ever used by that thread. The
latest :class:`FeederState` per feeder (and the last error, if a run failed) is kept in
memory for the API. A failing feeder is logged and keeps its previous state; the others run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from derms.errors import DermsError
from derms.grid.bundled import resolve_master
from derms.grid.elements import ModelElements
from derms.monitoring.background import BackgroundLoop
from derms.monitoring.feeder_monitor import FeederMonitor, FeederState, MonitorConfig
from derms.monitoring.placement import sync_placement_alarms
from derms.store.locks import lock_feeders
from derms.store.models import FeederModelVersion
from derms.store.types import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunError:
    t: datetime
    error: str


class MonitorResults:
    """Latest state, last error and run count per feeder, thread-safe (the read side of the
    monitoring cycle, in process or in a child process)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[str, FeederState] = {}
        self._errors: dict[str, RunError] = {}
        self._runs: dict[str, int] = {}

    def record(self, feeder_id: str, state: FeederState | None, err: RunError | None) -> None:
        with self._cond:
            if state is not None:
                self._states[feeder_id] = state
                self._errors.pop(feeder_id, None)
            else:
                self._errors[feeder_id] = err
            self._runs[feeder_id] = self._runs.get(feeder_id, 0) + 1
            self._cond.notify_all()

    def latest(self, feeder_id: str) -> FeederState | None:
        with self._cond:
            return self._states.get(feeder_id)

    def last_error(self, feeder_id: str) -> RunError | None:
        with self._cond:
            return self._errors.get(feeder_id)

    def runs(self, feeder_id: str) -> int:
        """Completed runs (successful or not) of a feeder."""
        with self._cond:
            return self._runs.get(feeder_id, 0)

    def feeders(self) -> set[str]:
        with self._cond:
            return set(self._runs)

    def wait_for_runs(self, feeder_id: str, count: int, timeout: float) -> bool:
        """Block until ``feeder_id`` has completed ``count`` runs (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._runs.get(feeder_id, 0) >= count, timeout)


class MonitorLoop(BackgroundLoop):
    """Runs the feeder monitors on a cycle (see module docstring).

    ``clock`` returns the aware UTC time used as ``now`` for each run (tests pass their own).
    """

    thread_name = "derms-monitor"

    def __init__(self, monitors: dict[str, FeederMonitor] | None = None, *,
                 period_s: float = 60.0, clock: Callable[[], datetime] = utcnow,
                 factory: Callable[[], dict[str, FeederMonitor]] | None = None,
                 on_result: Callable[[str, FeederState | None, RunError | None], None]
                 | None = None,
                 discover: Callable[[dict[str, int | None]], dict[str, FeederMonitor]]
                 | None = None,
                 discover_every_s: float = 60.0) -> None:
        self.monitors: dict[str, FeederMonitor] = dict(monitors or {})
        # ``discover`` (on the loop's thread, every ``discover_every_s`` and at
        # :meth:`notify_models_changed`): monitors for feeders registered, or given a new
        # model version, while the loop runs (feeder -> present version in, new out)
        self._discover, self.discover_every_s = discover, float(discover_every_s)
        self._discover_at = time.monotonic() + self.discover_every_s
        # ``factory`` builds the monitors on the loop's own thread when it starts, so
        # that every OpenDSS engine is created, used and closed by that one thread
        # (dss-python contexts used across threads crashed; see docs/ARCHITECTURE.md)
        self._factory = factory
        self._on_result = on_result  # called on the loop's thread after every run
        self._owned: list[FeederMonitor] = []
        self.period_s = float(period_s)
        self.clock = clock
        super().__init__()
        self._pending: set[str] = set()
        self.results = MonitorResults()
        self.latest, self.last_error = self.results.latest, self.results.last_error
        self.runs, self.wait_for_runs = self.results.runs, self.results.wait_for_runs

    # -- registry and results -------------------------------------------------------------
    def add(self, monitor: FeederMonitor) -> None:
        with self._cond:
            self.monitors[monitor.feeder_id] = monitor
            self._pending.add(monitor.feeder_id)
            self._cond.notify_all()

    def notify_models_changed(self) -> None:
        """Look for new feeders or model versions now (a model was registered)."""
        with self._cond:
            self._discover_at = 0.0
            self._cond.notify_all()

    def _discover_new(self) -> None:
        """Run ``discover`` (loop thread); swap in the monitors it builds."""
        self._discover_at = time.monotonic() + self.discover_every_s
        with self._cond:
            known = {f: m.model_version for f, m in self.monitors.items()}
        try:
            built = self._discover(known)
        except Exception:  # a bad store must not stop the cycle
            log.exception("monitor_discover_failed")
            return
        for fid, mon in built.items():
            with self._cond:
                old = self.monitors.get(fid)
                self.monitors[fid] = mon
                self._owned.append(mon)
                self._pending.add(fid)
            log.info("monitor_feeder_%s feeder=%s master=%s version=%s",
                     "replaced" if old else "added", fid, mon.master, mon.model_version)
            if old is not None:  # this thread runs the monitors: none is in use now
                if old in self._owned:
                    self._owned.remove(old)
                old.close()

    def notify_topology_change(self, feeder_id: str) -> None:
        """Re-estimate ``feeder_id`` now (e.g. a switch changed); unknown ids are ignored."""
        with self._cond:
            if feeder_id in self.monitors:
                self._pending.add(feeder_id)
                self._cond.notify_all()

    def run_feeder(self, feeder_id: str) -> FeederState | None:
        """Run one feeder now in the calling thread; record its state or error."""
        monitor = self.monitors[feeder_id]
        now = self.clock()
        state = None
        try:
            state = monitor.run_once(now)
        except Exception as exc:
            log.exception("monitor_run_failed feeder=%s", feeder_id)
            err = RunError(now, f"{type(exc).__name__}: {exc}" if isinstance(exc, DermsError)
                           else type(exc).__name__)
        self.results.record(feeder_id, state, None if state is not None else err)
        if self._on_result is not None:
            try:
                self._on_result(feeder_id, state, None if state is not None else err)
            except Exception:  # a listener must not stop the cycle
                log.exception("monitor_on_result_failed feeder=%s", feeder_id)
        return state

    def _on_start(self) -> None:
        self._pending.update(self.monitors)  # first cycle at once

    def close(self) -> None:
        """Stop and release every engine (those the factory built are closed by the loop's
        thread as it ends)."""
        self.stop()
        for m in self.monitors.values():
            if m not in self._owned:
                m.close()

    def _run(self) -> None:
        if self._factory is not None:
            try:
                built = self._factory()
            except Exception:  # a bad store must not kill the thread silently
                log.exception("monitor_factory_failed")
                built = {}
            with self._cond:
                self._owned = list(built.values())
                self.monitors.update(built)
                self._pending.update(built)
        try:
            self._loop()
        finally:
            for m in self._owned:
                m.close()

    def _loop(self) -> None:
        deadline: dict[str, float] = {}
        while True:
            discover = False
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    for f in self.monitors:
                        if now >= deadline.get(f, 0.0):
                            self._pending.add(f)
                    discover = self._discover is not None and now >= self._discover_at
                    if self._pending or discover:
                        break
                    wait = min((deadline.get(f, 0.0) for f in self.monitors),
                               default=now + self.period_s) - now
                    if self._discover is not None:
                        wait = min(wait, self._discover_at - now)
                    self._cond.wait(max(wait, 0.01))
                if self._stop:
                    return
            if discover:
                self._discover_new()
            with self._cond:
                todo = sorted(self._pending)
                self._pending.clear()
            for f in todo:
                deadline[f] = time.monotonic() + self.period_s
                self.run_feeder(f)


def model_path_of(db: Engine, feeder_id: str, now: datetime | None = None) -> Path | None:
    """The OpenDSS master of a feeder: ``source_uri`` of its latest ``FeederModelVersion``
    (highest version with ``valid_from <= now`` and ``source_format == "opendss"``); a file
    path (``file://`` allowed) or a bundled feeder name ("ieee13"). None if there is none."""
    found = model_version_of(db, feeder_id, now)
    return None if found is None else found[0]


def model_version_of(db: Engine, feeder_id: str, now: datetime | None = None
                     ) -> tuple[Path, int] | None:
    """(master, version number) of the feeder's latest model (see :func:`model_path_of`)."""
    now = now or utcnow()
    stmt = (select(FeederModelVersion.source_uri, FeederModelVersion.version).where(
        FeederModelVersion.feeder_id == feeder_id, FeederModelVersion.valid_from <= now,
        FeederModelVersion.source_format == "opendss")
        .order_by(FeederModelVersion.version.desc()).limit(1))
    with db.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None or not row.source_uri:
        return None
    return resolve_master(row.source_uri.removeprefix("file://")).resolve(), int(row.version)


def monitors_from_store(db: Engine, config: MonitorConfig | None = None,
                        known: Mapping[str, int | None] | None = None
                        ) -> dict[str, FeederMonitor]:
    """A monitor for every feeder whose latest OpenDSS model version resolves to a file;
    feeders whose model cannot be found or compiled are logged and left out. ``known``
    (feeder -> model version of its present monitor): only feeders that are new or have
    another latest version get a monitor (a file edited in place and registered again is
    a new version)."""
    known = known or {}
    with db.connect() as conn:
        ids = conn.execute(select(func.distinct(FeederModelVersion.feeder_id))).scalars().all()
    out = {}
    for fid in sorted(ids):
        try:
            found = model_version_of(db, fid)
            if found is None or (fid in known and known[fid] == found[1]):
                continue
            out[fid] = FeederMonitor(fid, found[0], db, config)
            out[fid].model_version = found[1]
        except DermsError as exc:
            log.warning("monitor_feeder_skipped feeder=%s error=%s", fid, exc)
            continue
        sync_version_placement(db, fid, found[1])
    return out


def sync_version_placement(db: Engine, feeder_id: str, version: int) -> None:
    """Raise and clear the feeder's ``placement_unknown:`` alarms against the stored buses
    of model ``version``, the one now in force (registration checks a version only when
    it is in force at once; one registered for later is checked here, when a monitor takes
    it up). Nothing without stored buses; a failure is logged, never raised. Under the
    feeder's lock (:func:`derms.store.locks.lock_feeders`): a registration checked against
    the version before is stored before the alarms are worked out, or after, against this
    one."""
    try:
        with Session(db) as s, s.begin():
            lock_feeders(s, [feeder_id])
            el = s.scalar(select(FeederModelVersion.elements).where(
                FeederModelVersion.feeder_id == feeder_id,
                FeederModelVersion.version == version))
            if el:
                sync_placement_alarms(s, feeder_id, ModelElements.from_json(el), version,
                                      utcnow())
    except Exception as exc:  # noqa: BLE001 - alarms must not stop the monitor's start
        log.warning("monitor_placement_sync_failed feeder=%s version=%s error=%s",
                    feeder_id, version, exc)


__all__ = ["MonitorLoop", "RunError", "model_path_of", "model_version_of",
           "monitors_from_store", "sync_version_placement"]
