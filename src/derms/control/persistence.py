"""Control requests in the store, every change audited (``control_requests`` + ``audit_log``).

Each function works in the caller's session, so a request and its audit record commit
together (or not at all). Audit entries have ``entity="control_request"`` and the request
id; actions:

* ``submit`` — a new request (detail: the request and its reason);
* ``withdraw`` — ended early by its source (detail: time, who, why);
* ``expire`` — its expiry has passed (written once, by :func:`sweep_expired`, also for
  requests that expired while the server was down);
* ``arbitrate`` (``entity="der_device"``) — a device's effective command changed
  (detail: :meth:`derms.control.arbiter.Decision.to_dict`, with every ruling and why).

A restart rebuilds the arbiter with :func:`load_open`: only requests that have not ended
(not withdrawn, expiry in the future) come back, so nothing expired is re-applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from derms.control.arbiter import Decision, RequestConflict
from derms.control.requests import ControlRequest, DeviceLocation, Scope, Source
from derms.errors import InputError
from derms.store.audit import append_audit
from derms.store.models import ControlRequestRecord, DerDevice, DerSite
from derms.store.types import ensure_utc

ENTITY = "control_request"


class UnknownRequest(InputError):
    """No control request has this id."""


def to_record(req: ControlRequest) -> ControlRequestRecord:
    s = req.scope
    return ControlRequestRecord(
        request_id=req.request_id, source=req.source.value, kind=req.kind.value,
        scope_kind=s.kind.value, feeder_id=s.feeder_id, section_id=s.section_id,
        buses=sorted(s.buses) if s.buses else None, connection_point=s.connection_point,
        der_id=s.der_id, value_kw=req.value_kw, start=req.start, expiry=req.expiry,
        issued_at=req.issued_at, withdrawn_at=req.withdrawn_at, actor=req.actor,
        reason=req.reason)


def from_record(rec: ControlRequestRecord) -> ControlRequest:
    scope = Scope(rec.scope_kind, feeder_id=rec.feeder_id,  # type: ignore[arg-type]
                  section_id=rec.section_id, buses=frozenset(rec.buses or ()),
                  connection_point=rec.connection_point, der_id=rec.der_id)
    return ControlRequest(rec.request_id, rec.source, rec.kind, scope,  # type: ignore[arg-type]
                          rec.start, rec.expiry, value_kw=rec.value_kw,
                          issued_at=rec.issued_at, reason=rec.reason, actor=rec.actor,
                          withdrawn_at=rec.withdrawn_at)


def submit(session: Session, req: ControlRequest, *, actor: str, start_defaulted: bool = False
           ) -> tuple[ControlRequest, bool]:
    """Store ``req`` and audit it; returns the stored request and whether it is new.
    The same id with the same content is an idempotent resend (nothing written);
    with other content :class:`RequestConflict`. ``start_defaulted``: ``req``'s start is
    "now at first arrival", so a stored request's start is compared instead (read once,
    here: a second read could find a request stored since the first, and a resend whose
    start was taken from the first answered 409)."""
    old = session.get(ControlRequestRecord, req.request_id)
    if old is not None:
        stored = from_record(old)
        if start_defaulted:
            req = replace(req, start=stored.start)
        if stored.same_content(req):
            return stored, False
        raise RequestConflict(f"control request {req.request_id!r} exists with other "
                              "content; use a new id")
    if not req.actor:
        req = replace(req, actor=actor)
    session.add(to_record(req))
    session.flush()
    append_audit(session, actor=actor, action="submit", entity=ENTITY,
                 entity_id=req.request_id, detail=req.to_dict())
    return req, True


def get(session: Session, request_id: str) -> ControlRequest:
    rec = session.get(ControlRequestRecord, request_id)
    if rec is None:
        raise UnknownRequest(f"unknown control request {request_id!r}")
    return from_record(rec)


def withdraw(session: Session, request_id: str, t: datetime, *, actor: str, reason: str = "",
             sources: Iterable[Source] | None = None) -> tuple[ControlRequest, bool]:
    """End ``request_id`` at ``t`` (audited). ``sources``: the sources this path may
    withdraw (others → :class:`RequestConflict`). Withdrawing a request that has already
    ended changes nothing and returns False (a resent withdrawal is harmless)."""
    t = ensure_utc(t, "withdrawal time")
    rec = session.get(ControlRequestRecord, request_id, with_for_update=True)
    if rec is None:
        raise UnknownRequest(f"unknown control request {request_id!r}")
    allowed = None if sources is None else {Source(s).value for s in sources}
    if allowed is not None and rec.source not in allowed:
        raise RequestConflict(f"control request {request_id!r} comes from {rec.source}; "
                              f"this interface may withdraw only {', '.join(sorted(allowed))} "
                              "requests")
    if rec.ended_at is not None or rec.withdrawn_at is not None or rec.expiry <= t:
        return from_record(rec), False
    rec.withdrawn_at = rec.ended_at = t
    rec.end_reason = "withdrawn"
    session.flush()
    append_audit(session, actor=actor, action="withdraw", entity=ENTITY, entity_id=request_id,
                 detail={"withdrawn_at": t.isoformat(), "reason": reason,
                         "source": rec.source, "kind": rec.kind}, t=t)
    return from_record(rec), True


def sweep_expired(session: Session, now: datetime, *, actor: str = "arbiter"
                  ) -> list[ControlRequest]:
    """Record (and audit, once) every request whose expiry is at or before ``now``."""
    now = ensure_utc(now, "now")
    recs = session.scalars(select(ControlRequestRecord)
                           .where(ControlRequestRecord.ended_at.is_(None),
                                  ControlRequestRecord.expiry <= now)
                           .order_by(ControlRequestRecord.expiry,
                                     ControlRequestRecord.request_id)
                           .with_for_update()).all()
    out = []
    for rec in recs:
        rec.ended_at, rec.end_reason = rec.expiry, "expired"
        append_audit(session, actor=actor, action="expire", entity=ENTITY,
                     entity_id=rec.request_id,
                     detail={"expiry": rec.expiry.isoformat(), "source": rec.source,
                             "kind": rec.kind, "reason": "expiry passed"}, t=now)
        out.append(from_record(rec))
    session.flush()
    return out


def load_open(session: Session, now: datetime) -> list[ControlRequest]:
    """Requests still in force or scheduled at ``now`` (not ended, expiry after ``now``)."""
    now = ensure_utc(now, "now")
    recs = session.scalars(select(ControlRequestRecord)
                           .where(ControlRequestRecord.ended_at.is_(None),
                                  ControlRequestRecord.withdrawn_at.is_(None),
                                  ControlRequestRecord.expiry > now)
                           .order_by(ControlRequestRecord.start,
                                     ControlRequestRecord.request_id)).all()
    return [from_record(r) for r in recs]


def list_requests(session: Session, *, open_at: datetime | None = None,
                  source: Source | None = None, limit: int = 100, offset: int = 0
                  ) -> list[ControlRequest]:
    """Requests by start, newest first; ``open_at``: only those not ended at that time."""
    stmt = select(ControlRequestRecord)
    if open_at is not None:
        open_at = ensure_utc(open_at, "open_at")
        stmt = stmt.where(ControlRequestRecord.ended_at.is_(None),
                          ControlRequestRecord.withdrawn_at.is_(None),
                          ControlRequestRecord.expiry > open_at)
    if source is not None:
        stmt = stmt.where(ControlRequestRecord.source == Source(source).value)
    stmt = stmt.order_by(ControlRequestRecord.start.desc(),
                         ControlRequestRecord.request_id).limit(limit).offset(offset)
    return [from_record(r) for r in session.scalars(stmt)]


def device_locations(session: Session, der_ids: Iterable[str] | None = None
                     ) -> list[DeviceLocation]:
    """Where the registered devices are: feeder and connection point from their site,
    bus from the device (or else its site)."""
    stmt = (select(DerDevice.der_id, DerDevice.bus, DerSite.bus, DerSite.feeder_id,
                   DerSite.site_id)
            .join(DerSite, DerSite.site_id == DerDevice.site_id).order_by(DerDevice.der_id))
    if der_ids is not None:
        stmt = stmt.where(DerDevice.der_id.in_(list(der_ids)))
    return [DeviceLocation(der_id, feeder_id=feeder_id, bus=dev_bus or site_bus,
                           connection_point=site_id)
            for der_id, dev_bus, site_bus, feeder_id, site_id in session.execute(stmt)]


def audit_decision(session: Session, decision: Decision, *, actor: str = "arbiter") -> None:
    """Write one arbitration decision (what governs the device and why) to the audit log."""
    append_audit(session, actor=actor, action="arbitrate", entity="der_device",
                 entity_id=decision.der_id, detail=decision.to_dict(), t=decision.t)


__all__ = ["ENTITY", "UnknownRequest", "audit_decision", "device_locations", "from_record",
           "get", "list_requests", "load_open", "submit", "sweep_expired", "to_record",
           "withdraw"]
