"""Raise and clear the monitor's alarms in the store (``alarms`` table).

An alarm condition is identified by ``(kind, feeder_id, der_id, meter_id)``. The store's
``Alarm`` has no element column, so the element is part of ``kind``:
``undervoltage:<bus>.<node>``, ``overvoltage:<bus>.<node>``,
``thermal:<element>.<node>`` (e.g. ``thermal:line.650632.1``), and ``telemetry_stale`` with
``der_id`` or ``meter_id`` set (kinds longer than 64 characters are cut). :func:`sync_alarms`
inserts a row for each condition that holds and has no open alarm (``t_cleared`` null) yet,
and sets ``t_cleared`` on the open alarms of the monitor's own kinds
(:data:`MONITOR_KINDS` prefixes) on this feeder whose condition no longer holds. Every raise
and clear is audited (actor ``monitor``). ``topology_not_applied:<switch>`` is one of the
monitor's kinds: left out, every run had raised a new alarm for the same switch and none
was ever cleared. Other owners sync their own prefixes (``kinds``), e.g. the registry's
``placement_unknown:`` alarms (:mod:`derms.monitoring.placement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from derms.store.audit import append_audit
from derms.store.models import Alarm, Severity

MONITOR_KINDS = ("undervoltage:", "overvoltage:", "thermal:", "telemetry_stale",
                 "estimation_failed", "topology_not_applied:")
_KIND_LEN = 64


@dataclass(frozen=True, slots=True)
class AlarmCondition:
    """One condition that holds now (an alarm should be open for it)."""

    kind: str
    severity: Severity
    message: str
    der_id: str | None = None
    meter_id: str | None = None

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return self.kind[:_KIND_LEN], self.der_id, self.meter_id


@dataclass(frozen=True, slots=True)
class AlarmSync:
    raised: list[int]
    cleared: list[int]
    open: int


def sync_alarms(session: Session, feeder_id: str, conditions: list[AlarmCondition],
                now: datetime, *, kinds: tuple[str, ...] = MONITOR_KINDS,
                actor: str = "monitor") -> AlarmSync:
    """Make the open alarms of ``feeder_id`` whose kind starts with one of ``kinds`` (the
    monitor's by default) match ``conditions`` (caller commits)."""
    stmt = select(Alarm).where(
        Alarm.feeder_id == feeder_id, Alarm.t_cleared.is_(None),
        or_(*[Alarm.kind.startswith(k) for k in kinds]))
    open_alarms = {(a.kind, a.der_id, a.meter_id): a for a in session.scalars(stmt)}
    wanted = {c.key: c for c in conditions}
    raised, cleared = [], []
    for key, alarm in open_alarms.items():
        if key not in wanted:
            alarm.t_cleared = now
            cleared.append(alarm)
        else:  # still holds: its message (and severity) say how it stands now, not when
            # it was raised (an undervoltage raised at 0.946 pu read 0.946 at 0.922)
            c = wanted[key]
            alarm.message, alarm.severity = c.message, c.severity
    new = [Alarm(kind=key[0], severity=c.severity, feeder_id=feeder_id, der_id=c.der_id,
                 meter_id=c.meter_id, message=c.message, t_raised=now)
           for key, c in wanted.items() if key not in open_alarms]
    session.add_all(new)
    session.flush()
    for a in new:
        raised.append(a.id)
        append_audit(session, actor=actor, action="alarm_raise", entity="alarm",
                     entity_id=str(a.id), detail={"kind": a.kind, "feeder_id": feeder_id},
                     t=now)
    for a in cleared:
        append_audit(session, actor=actor, action="alarm_clear", entity="alarm",
                     entity_id=str(a.id), detail={"kind": a.kind, "feeder_id": feeder_id},
                     t=now)
    return AlarmSync(raised=raised, cleared=[a.id for a in cleared],
                     open=len(open_alarms) - len(cleared) + len(new))


__all__ = ["MONITOR_KINDS", "AlarmCondition", "AlarmSync", "sync_alarms"]
