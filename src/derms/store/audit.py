"""Append-only audit log: who did what to which entity, when.

The database refuses UPDATE and DELETE on ``audit_log`` (and TRUNCATE on PostgreSQL):
triggers created by the initial migration (PostgreSQL: a plpgsql trigger function raising
``insufficient_privilege``; SQLite: ``RAISE(ABORT)`` triggers). This module only appends
and reads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from derms.errors import InputError
from derms.store.models import AuditEntry
from derms.store.types import ensure_utc, utcnow


def append_audit(session: Session, *, actor: str, action: str, entity: str,
                 entity_id: str = "", detail: dict[str, Any] | None = None,
                 t: datetime | None = None) -> AuditEntry:
    """Add one audit entry to ``session`` (committed with the caller's transaction, so the
    change and its audit record succeed or fail together). ``t`` defaults to now (UTC)."""
    for name, value in (("actor", actor), ("action", action), ("entity", entity)):
        if not value or not isinstance(value, str):
            raise InputError(f"audit {name}: a non-empty string is required, got {value!r}")
    entry = AuditEntry(actor=actor, action=action, entity=entity, entity_id=entity_id,
                       detail=dict(detail or {}), t=utcnow() if t is None else ensure_utc(t, "t"))
    session.add(entry)
    session.flush()
    return entry


def read_audit(session: Session, *, entity: str | None = None, entity_id: str | None = None,
               start: datetime | None = None, end: datetime | None = None,
               limit: int = 1000) -> list[AuditEntry]:
    """Audit entries in ``[start, end)`` (optionally for one entity), oldest first."""
    stmt = select(AuditEntry).order_by(AuditEntry.t, AuditEntry.id).limit(limit)
    if entity is not None:
        stmt = stmt.where(AuditEntry.entity == entity)
    if entity_id is not None:
        stmt = stmt.where(AuditEntry.entity_id == entity_id)
    if start is not None:
        stmt = stmt.where(AuditEntry.t >= ensure_utc(start, "start"))
    if end is not None:
        stmt = stmt.where(AuditEntry.t < ensure_utc(end, "end"))
    return list(session.scalars(stmt))
