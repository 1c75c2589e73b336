"""Alarms for devices and meters a feeder's new model version cannot place.

Registration refuses a bus, phase or service transformer the feeder's model lacks
(:mod:`derms.api.placement`), but devices and meters registered before the feeder had a
model, or under an earlier version, may name buses a new version does not have; the
control loop and the monitor would skip them (only a note). When a version is registered,
each such device or meter gets an open ``placement_unknown:<der_id or meter_id>`` alarm
(warning, ``der_id`` / ``meter_id`` set, the message naming the field, the value and the
version); the alarms of this kind on the feeder that no longer hold (a later version has
the bus) are cleared. Audited as actor ``registry``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from derms.grid.elements import ModelElements
from derms.monitoring.alarms import AlarmCondition, AlarmSync, sync_alarms
from derms.store.models import DerDevice, DerSite, Meter, Severity

KIND = "placement_unknown:"


def placement_conditions(session: Session, feeder_id: str, elements: ModelElements,
                         version: int) -> list[AlarmCondition]:
    """One condition per device (on the feeder's sites; its own bus, else its site's) and
    meter of ``feeder_id`` whose bus, phase or service transformer ``elements`` lacks."""
    out: list[AlarmCondition] = []
    devices = session.execute(
        select(DerDevice.der_id, DerDevice.bus, DerSite.bus, DerDevice.phase,
               DerDevice.service_transformer)
        .join(DerSite, DerDevice.site_id == DerSite.site_id)
        .where(DerSite.feeder_id == feeder_id).order_by(DerDevice.der_id)).all()
    meters = session.execute(
        select(Meter.meter_id, Meter.bus, Meter.phase, Meter.service_transformer)
        .where(Meter.feeder_id == feeder_id).order_by(Meter.meter_id)).all()
    rows = [("device", d.der_id, d[1] or d[2], d.phase, d.service_transformer)
            for d in devices] + [("meter", m.meter_id, m.bus, m.phase, m.service_transformer)
                                 for m in meters]
    for what, ident, bus, phase, xfm in rows:
        problem = _problem(elements, bus, phase, xfm)
        if problem is None:
            continue
        out.append(AlarmCondition(
            kind=f"{KIND}{ident}", severity=Severity.WARNING,
            der_id=ident if what == "device" else None,
            meter_id=ident if what == "meter" else None,
            message=f"{what} {ident}: {problem} (model version {version}); it is left out "
                    "of monitoring and control until its placement or the model is fixed"))
    return out


def _problem(el: ModelElements, bus: str | None, phase, xfm: str | None) -> str | None:
    if bus:
        problem = el.bus_problem(bus)
        if problem is None and phase is not None:
            problem = el.phase_problem(bus, str(getattr(phase, "value", phase)))
        if problem is not None:
            return problem
    return el.transformer_problem(xfm) if xfm else None


def sync_placement_alarms(session: Session, feeder_id: str, elements: ModelElements,
                          version: int, now: datetime) -> AlarmSync:
    """Raise and clear the feeder's ``placement_unknown:`` alarms against ``elements``
    (the caller commits)."""
    conds = placement_conditions(session, feeder_id, elements, version)
    return sync_alarms(session, feeder_id, conds, now, kinds=(KIND,), actor="registry")


__all__ = ["KIND", "placement_conditions", "sync_placement_alarms"]
