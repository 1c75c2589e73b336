"""Building the control loop of :mod:`derms.control.loop` (a mixin of its
:class:`~derms.control.loop.ControlLoop`): the feeder's model version in force (or the
``master`` given) compiled, controls settled once and frozen, the latest switch states
applied, the DER registry from the store mapped onto the model's nodes, and a new
:class:`~derms.control.fast_cycle.FastCycle` keeping the loop's issuer; rebuilt when the
topology, the DER set or the model version in force changes (the loop's docstring, step
1, and its "DER registry" and "Restart" paragraphs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from derms.control.fast_cycle import DerRegistry, FastCycle
from derms.control.loop_measurements import StoreMeasurements
from derms.control.requests import DeviceLocation
from derms.errors import InputError
from derms.grid.bundled import resolve_master
from derms.grid.elements import bus_of
from derms.monitoring.cycle import model_path_of, model_version_of, sync_version_placement
from derms.monitoring.feeder_monitor import PHASE_NODE
from derms.powerflow.engine import OpenDSSEngine, SolveSettings
from derms.powerflow.voltage_measure import delta_terms
from derms.store.audit import append_audit
from derms.store.models import DerDevice, DerSite, DerType, DeviceStatus, TopologyEvent
from derms.store.types import ensure_utc

log = logging.getLogger("derms.control.loop")
KIND = {DerType.PV: "pv", DerType.WIND: "wind", DerType.BATTERY: "battery",
        DerType.EV_CHARGER: "ev", DerType.FLEXIBLE_LOAD: "flexible_load",
        DerType.GENERATOR: "generator", DerType.OTHER: "other"}


@dataclass
class LoopDer:
    """A DER of the loop's registry: its injection terms on the model and its limits."""

    der_id: str
    kind: str
    nodes: tuple[str, ...]
    bus: str
    site_id: str
    active: bool
    p_gen_max_kw: float
    p_charge_max_kw: float
    rating_kw: float


class BuildMixin:
    """Build methods of the control loop (attributes are the loop's)."""

    def _master_path(self, now: datetime) -> Path:
        """The OpenDSS master: the one given, else the feeder's model version in force."""
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
                       ) -> tuple[list[LoopDer], list[str]]:
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
            out.append(LoopDer(der_id, KIND.get(DerType(dtype), "other"), pts, bus, site_id,
                               DeviceStatus(status) is DeviceStatus.ACTIVE, float(gmax or 0),
                               float(cmax or 0), float(max(gmax or 0, cmax or 0, smax or 0))))
        return out, skipped

    def _close_engine(self) -> None:
        """Close the cycle's engine (on the thread that built it) and drop the cycle."""
        if self._cycle is not None:
            self._cycle.engine.close()
            self._cycle = self._meas = None

    def _build_outdated(self, now: datetime) -> bool:
        """Whether the cycle must be (re)built at ``now``: never built, or the topology,
        the DER set or the model version in force changed since."""
        return (self._cycle is None or self._topology_marker(now) != self._topology_mark
                or tuple(self._load_ders()) != self._built_key
                or self._version_in_force(now) != self._model_version)


__all__ = ["KIND", "BuildMixin", "LoopDer"]
