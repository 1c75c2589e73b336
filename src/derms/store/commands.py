"""Commands of the control loop in the store (``control_commands``, migration 0007).

One row per :class:`derms.control.commands.DeviceCommand` (one decision for one DER),
keyed by its ``command_id`` (the IEEE 2030.5 mRID it goes out under): a command is stored
once, whatever happens (a resend, a restart, a retry). Signs as the command's: ``p_kw`` is
the DER's net **import** at its terminals (``> 0`` consuming/charging, ``< 0``
generating/discharging); ``measured_p_kw`` likewise.

``state`` follows the command's life (:data:`COMMAND_STATES`):

* ``issued`` — decided and stored, not yet handed to a protocol adapter;
* ``sent`` — handed to the adapter (``sent_at``);
* ``acknowledged`` — the device answered it received/started/completed it
  (``acknowledged_at``, ``ack_status`` the protocol's status code);
* ``delivered`` / ``not_delivered`` — telemetry after the grace period did / did not show
  the command obeyed (``verified_at``, ``measured_p_kw``, ``detail`` why), or the device
  declined or rejected it (``not_delivered`` with ``ack_status``);
* ``superseded`` — a newer command for the DER replaced it before it was verified
  (``superseded_by``);
* ``expired`` — its validity ended before it could be verified (no telemetry after the
  grace period), or before it was ever sent (a restart after its end: never re-sent).

The last four are final. Functions here are plain queries and writes in the caller's
session (the logic of the states lives in :mod:`derms.control.tracking`); this layer knows
nothing of the control or protocol packages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Float, Index, SmallInteger, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column, validates

from derms.store.models import Base
from derms.store.types import ensure_utc, utcnow

ISSUED, SENT, ACKNOWLEDGED = "issued", "sent", "acknowledged"
DELIVERED, NOT_DELIVERED, SUPERSEDED, EXPIRED = (
    "delivered", "not_delivered", "superseded", "expired")
COMMAND_STATES = (ISSUED, SENT, ACKNOWLEDGED, DELIVERED, NOT_DELIVERED, SUPERSEDED, EXPIRED)
OPEN_STATES = (ISSUED, SENT, ACKNOWLEDGED)
FINAL_STATES = (DELIVERED, NOT_DELIVERED, SUPERSEDED, EXPIRED)
COMMAND_MODES = ("p_setpoint", "export_limit", "import_limit", "release")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class ControlCommandRecord(Base):
    """One device command of the control loop and what became of it (module docstring)."""

    __tablename__ = "control_commands"
    __table_args__ = (
        CheckConstraint(_in("state", COMMAND_STATES), name="state_known"),
        CheckConstraint(_in("mode", COMMAND_MODES), name="mode_known"),
        CheckConstraint("valid_until > valid_from", name="valid_after_from"),
        Index("ix_control_commands_der_issued", "der_id", "issued_at"),
        Index("ix_control_commands_state_until", "state", "valid_until"),
        Index("ix_control_commands_feeder_issued", "feeder_id", "issued_at"),
    )
    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    der_id: Mapped[str] = mapped_column(String(64))
    feeder_id: Mapped[str] = mapped_column(String(64))
    cycle_id: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))
    p_kw: Mapped[float] = mapped_column(Float)
    q_kvar: Mapped[float | None] = mapped_column(Float)
    valid_from: Mapped[datetime]
    valid_until: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text, default="")
    issued_at: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(16), default=ISSUED)
    sent_at: Mapped[datetime | None]
    acknowledged_at: Mapped[datetime | None]
    ack_status: Mapped[int | None] = mapped_column(SmallInteger)
    verified_at: Mapped[datetime | None]
    measured_p_kw: Mapped[float | None] = mapped_column(Float)
    measured_at: Mapped[datetime | None]
    superseded_by: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    @validates("valid_from", "valid_until", "issued_at", "sent_at", "acknowledged_at",
               "verified_at", "measured_at", "updated_at", include_backrefs=False)
    def _utc(self, key: str, value: datetime | None) -> datetime | None:
        return None if value is None else ensure_utc(value, f"ControlCommandRecord.{key}")

    def to_dict(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {"command_id": self.command_id, "der_id": self.der_id,
                "feeder_id": self.feeder_id, "cycle_id": self.cycle_id, "mode": self.mode,
                "p_kw": self.p_kw, "q_kvar": self.q_kvar, "valid_from": iso(self.valid_from),
                "valid_until": iso(self.valid_until), "reason": self.reason,
                "issued_at": iso(self.issued_at), "state": self.state,
                "sent_at": iso(self.sent_at), "acknowledged_at": iso(self.acknowledged_at),
                "ack_status": self.ack_status, "verified_at": iso(self.verified_at),
                "measured_p_kw": self.measured_p_kw, "measured_at": iso(self.measured_at),
                "superseded_by": self.superseded_by, "detail": self.detail}


COMMAND_TABLES = (ControlCommandRecord.__table__,)


def existing_ids(session: Session, command_ids: Iterable[str]) -> set[str]:
    """Which of ``command_ids`` are already stored (one query)."""
    ids = list(dict.fromkeys(command_ids))
    if not ids:
        return set()
    return set(session.scalars(select(ControlCommandRecord.command_id)
                               .where(ControlCommandRecord.command_id.in_(ids))))


def get_command(session: Session, command_id: str) -> ControlCommandRecord | None:
    return session.get(ControlCommandRecord, command_id)


def open_commands(session: Session, *, feeder_id: str | None = None,
                  der_ids: Sequence[str] | None = None, for_update: bool = False
                  ) -> list[ControlCommandRecord]:
    """Commands not yet in a final state, oldest first."""
    stmt = select(ControlCommandRecord).where(ControlCommandRecord.state.in_(OPEN_STATES))
    if feeder_id is not None:
        stmt = stmt.where(ControlCommandRecord.feeder_id == feeder_id)
    if der_ids is not None:
        stmt = stmt.where(ControlCommandRecord.der_id.in_(list(der_ids)))
    stmt = stmt.order_by(ControlCommandRecord.issued_at, ControlCommandRecord.command_id)
    if for_update:
        stmt = stmt.with_for_update()
    return list(session.scalars(stmt))


def valid_commands(session: Session, now: datetime, *, feeder_id: str | None = None
                   ) -> list[ControlCommandRecord]:
    """Commands in force at ``now`` (``valid_from <= now < valid_until``) that were not
    superseded, oldest first (the latest per DER is the standing decision)."""
    now = ensure_utc(now, "now")
    stmt = select(ControlCommandRecord).where(
        ControlCommandRecord.valid_from <= now, ControlCommandRecord.valid_until > now,
        ControlCommandRecord.state != SUPERSEDED)
    if feeder_id is not None:
        stmt = stmt.where(ControlCommandRecord.feeder_id == feeder_id)
    stmt = stmt.order_by(ControlCommandRecord.issued_at, ControlCommandRecord.command_id)
    return list(session.scalars(stmt))


def recent_verified(session: Session, der_ids: Sequence[str], *, per_der: int
                    ) -> dict[str, list[str]]:
    """The states (``delivered`` / ``not_delivered``) of each DER's latest ``per_der``
    verified commands, newest first."""
    out: dict[str, list[str]] = {d: [] for d in der_ids}
    if not der_ids:
        return out
    stmt = (select(ControlCommandRecord.der_id, ControlCommandRecord.state)
            .where(ControlCommandRecord.der_id.in_(list(der_ids)),
                   ControlCommandRecord.state.in_((DELIVERED, NOT_DELIVERED)))
            .order_by(ControlCommandRecord.der_id, ControlCommandRecord.verified_at.desc(),
                      ControlCommandRecord.command_id.desc()))
    for der_id, state in session.execute(stmt):
        if len(out[der_id]) < per_der:
            out[der_id].append(state)
    return out


def latest_verified(session: Session, der_ids: Sequence[str]
                    ) -> dict[str, ControlCommandRecord]:
    """Each DER's most recently verified command (delivered or not)."""
    out: dict[str, ControlCommandRecord] = {}
    if not der_ids:
        return out
    stmt = (select(ControlCommandRecord)
            .where(ControlCommandRecord.der_id.in_(list(der_ids)),
                   ControlCommandRecord.state.in_((DELIVERED, NOT_DELIVERED)))
            .order_by(ControlCommandRecord.verified_at, ControlCommandRecord.command_id))
    for rec in session.scalars(stmt):
        out[rec.der_id] = rec
    return out


def list_commands(session: Session, *, der_id: str | None = None, state: str | None = None,
                  feeder_id: str | None = None, limit: int = 100, offset: int = 0
                  ) -> tuple[int, list[ControlCommandRecord]]:
    """(total, page) of commands, newest first."""
    from sqlalchemy import func

    where = []
    if der_id is not None:
        where.append(ControlCommandRecord.der_id == der_id)
    if state is not None:
        where.append(ControlCommandRecord.state == state)
    if feeder_id is not None:
        where.append(ControlCommandRecord.feeder_id == feeder_id)
    total = session.scalar(select(func.count()).select_from(ControlCommandRecord).where(*where))
    rows = session.scalars(select(ControlCommandRecord).where(*where)
                           .order_by(ControlCommandRecord.issued_at.desc(),
                                     ControlCommandRecord.command_id)
                           .limit(limit).offset(offset)).all()
    return int(total or 0), list(rows)


__all__ = ["ACKNOWLEDGED", "COMMAND_MODES", "COMMAND_STATES", "COMMAND_TABLES", "DELIVERED",
           "EXPIRED", "FINAL_STATES", "ISSUED", "NOT_DELIVERED", "OPEN_STATES", "SENT",
           "SUPERSEDED", "ControlCommandRecord", "existing_ids", "get_command",
           "latest_verified", "list_commands", "open_commands", "recent_verified",
           "valid_commands"]
