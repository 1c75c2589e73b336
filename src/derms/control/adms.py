"""ADMS and operator messages: validated (pydantic), then stored and audited in one transaction.

The same ADMS message arrives by REST (``POST /v1/adms/messages``) or on the message bus
(:mod:`derms.control.adms_mqtt`). Its ``type`` is one of:

* ``block_dispatch`` — no DER dispatch in the scope (fault, restoration);
* ``limit_export`` / ``limit_import`` — ``limit_kw >= 0`` on a feeder, section (aggregate),
  connection point or device;
* ``abnormal_configuration`` — a feeder or section runs in an abnormal configuration;
* ``switching`` — switch states reported by the ADMS (``switches``: name and ``open`` /
  ``closed`` at ``t``); stored as topology events the monitor applies, each once (a
  repeat, with or without ``message_id``, also two sent at once, stores nothing new;
  another state of a switch at the same ``t`` is another event); with ``expiry`` also an
  ``abnormal_configuration`` of the feeder until then;
* ``withdraw`` — ends an ADMS request early (``request_id``).

Every request message needs an ``expiry`` (aware time, in the future); ``start`` defaults
to now. ``message_id`` makes a resend idempotent (request id ``adms-<message_id>``); it is
required on the bus, where redelivery is normal. There is no message type that commands a
switch, regulator or capacitor: such a message fails validation.

Operator overrides (REST only, ``POST /v1/operator/overrides``) are device setpoints
(import-positive kW), blocks or limits with an expiry; request id ``op-<override_id>``.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from derms.control import persistence
from derms.control.requests import (
    SETPOINT_KINDS,
    CommandKind,
    ControlRequest,
    Scope,
    ScopeKind,
    Source,
)
from derms.errors import InputError
from derms.grid.elements import ModelElements
from derms.store.audit import append_audit
from derms.store.db import upsert_insert
from derms.store.model_versions import stored_elements, version_in_force
from derms.store.models import (
    TOPOLOGY_EVENT_KEY,
    DerDevice,
    DerSite,
    Feeder,
    SwitchState,
    TopologyEvent,
)
from derms.strict import StrictScalars

MessageId = Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9._:\-]+$")]
Reason = Annotated[str, Field(default="", max_length=500)]
Kw = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class UnknownTarget(InputError):
    """A message names a feeder, device or connection point the store does not know."""


class ScopeIn(StrictScalars):
    """Where a request applies (see :class:`derms.control.requests.Scope`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["feeder", "section", "connection_point", "device"]
    feeder_id: str | None = Field(None, max_length=200)
    section_id: str | None = Field(None, max_length=200)
    buses: list[str] | None = Field(None, max_length=100_000)
    connection_point: str | None = Field(None, max_length=200)
    der_id: str | None = Field(None, max_length=200)

    def scope(self) -> Scope:
        return Scope.from_dict(self.model_dump(exclude_none=True))


class _Message(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    message_id: MessageId | None = None
    reason: Reason = ""


class _Request(_Message):
    scope: ScopeIn
    start: AwareDatetime | None = None
    expiry: AwareDatetime


class BlockDispatch(_Request):
    type: Literal["block_dispatch"]


class LimitExport(_Request):
    type: Literal["limit_export"]
    limit_kw: Kw


class LimitImport(_Request):
    type: Literal["limit_import"]
    limit_kw: Kw


class AbnormalConfiguration(_Request):
    type: Literal["abnormal_configuration"]


class SwitchIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    switch: str = Field(min_length=1, max_length=64)
    state: Literal["open", "closed"]


class Switching(_Message):
    type: Literal["switching"]
    feeder_id: str = Field(min_length=1, max_length=64)
    t: AwareDatetime
    switches: list[SwitchIn] = Field(min_length=1, max_length=1000)
    expiry: AwareDatetime | None = None

    @field_validator("switches")
    @classmethod
    def _one_state_each(cls, v: list[SwitchIn]) -> list[SwitchIn]:
        """A switch is in one state at ``t``: listed in both is a contradiction (422)."""
        seen: dict[str, str] = {}
        for k, sw in enumerate(v):
            name = sw.switch.strip().lower()
            if seen.setdefault(name, sw.state) != sw.state:
                raise ValueError(f"switches[{k}]: switch {sw.switch!r} is listed both "
                                 f"'{seen[name]}' and '{sw.state}' at the same t")
        return v


class Withdraw(_Message):
    type: Literal["withdraw"]
    request_id: str = Field(min_length=1, max_length=64)


AdmsMessage = Annotated[BlockDispatch | LimitExport | LimitImport | AbnormalConfiguration
                        | Switching | Withdraw, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AdmsMessage)


class OperatorOverrideIn(StrictScalars):
    """An operator override: ``operator_setpoint`` (``value_kw`` import-positive at the
    device: > 0 charging/consuming, < 0 generating), ``block_dispatch``, or a limit
    (``value_kw >= 0``), until ``expiry``."""

    model_config = ConfigDict(extra="forbid")
    override_id: MessageId | None = None
    kind: Literal["operator_setpoint", "block_dispatch", "limit_export",
                  "limit_import"] = "operator_setpoint"
    scope: ScopeIn
    value_kw: float | None = None
    start: AwareDatetime | None = None
    expiry: AwareDatetime
    reason: Reason = ""

    @field_validator("value_kw")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("value_kw must be finite")
        return v


def parse_adms(payload: bytes | str | dict) -> Any:
    """Validate one ADMS message (JSON text or a dict); raises :class:`MessageError`."""
    try:
        if isinstance(payload, dict):
            return _ADAPTER.validate_python(payload)
        return _ADAPTER.validate_json(payload)
    except ValidationError as exc:
        raise MessageError(exc) from None


class MessageError(InputError):
    """An ADMS message that fails validation; ``errors``: field and detail of each problem."""

    def __init__(self, exc: ValidationError) -> None:
        self.errors = [{"field": ".".join(str(p) for p in e.get("loc", ())),
                        "detail": e.get("msg", "")} for e in exc.errors()][:100]
        first = self.errors[0] if self.errors else {"field": "", "detail": "invalid"}
        super().__init__(f"invalid ADMS message: {first['field']}: {first['detail']}"
                         + (f" (+{len(self.errors) - 1} more)" if len(self.errors) > 1 else ""))


@dataclass
class Applied:
    """What a message did: requests created (or found, on a resend), withdrawn, and topology
    events stored; ``feeders_switched``: feeders whose monitor should re-estimate now."""

    requests: list[ControlRequest] = field(default_factory=list)
    created: bool = False
    withdrawn: list[str] = field(default_factory=list)
    topology_event_ids: list[int] = field(default_factory=list)
    feeders_switched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created,
                "requests": [r.to_dict() for r in self.requests],
                "withdrawn": self.withdrawn, "topology_event_ids": self.topology_event_ids,
                "feeders_switched": self.feeders_switched}


def _check_targets(session: Session, scope: Scope, kind: CommandKind | None = None,
                   value_kw: float | None = None) -> None:
    """UnknownTarget for a feeder, device or connection point the store does not know;
    InputError for a device setpoint beyond the device's kVA rating (1e308 kW on a 5 kVA
    PV was stored and "applied")."""
    if scope.kind in (ScopeKind.FEEDER, ScopeKind.SECTION):
        if session.get(Feeder, scope.feeder_id) is None:
            raise UnknownTarget(f"unknown feeder {scope.feeder_id!r}")
        if scope.kind is ScopeKind.SECTION:
            _check_section_buses(session, scope)
    elif scope.kind is ScopeKind.DEVICE:
        dev = session.get(DerDevice, scope.der_id)
        if dev is None:
            raise UnknownTarget(f"unknown device {scope.der_id!r}")
        if (kind in SETPOINT_KINDS and isinstance(value_kw, int | float)
                and not isinstance(value_kw, bool)
                and abs(value_kw) > dev.s_max_kva * (1 + 1e-9)):
            raise InputError(f"value_kw {value_kw:g}: beyond device {scope.der_id!r}'s "
                             f"rating of {dev.s_max_kva:g} kVA (a setpoint is within "
                             f"±{dev.s_max_kva:g} kW)")
    elif session.get(DerSite, scope.connection_point) is None:
        raise UnknownTarget(f"unknown connection point (DER site) {scope.connection_point!r}")


def _check_section_buses(session: Session, scope: Scope) -> None:
    """UnknownTarget when a section names buses its feeder's model lacks (the model
    version in force, else the latest, as the registry's placement check reads it; a
    section that matched nothing was stored and answered 201). Nothing is checked for a
    feeder without a model version, or one whose elements are not worked out yet."""
    v = version_in_force(session, scope.feeder_id)
    data = None if v is None else stored_elements(session, v.vid)
    if not data:
        return
    known = ModelElements.from_json(data).buses
    unknown = sorted(b for b in scope.buses if b not in known)
    if unknown:
        raise UnknownTarget(f"section {scope.section_id!r}: bus(es) {', '.join(unknown[:5])}"
                            f"{' …' if len(unknown) > 5 else ''} not in feeder "
                            f"{scope.feeder_id!r}'s model (version {v.version})")


def _request(session: Session, *, prefix: str, ident: str | None, source: Source,
             kind: CommandKind, scope: Scope, value_kw: float | None, start: datetime | None,
             expiry: datetime, reason: str, actor: str, now: datetime) -> Applied:
    if expiry <= now:
        raise InputError(f"expiry {expiry.isoformat()} has already passed (now "
                         f"{now.isoformat()}): every request needs a future expiry")
    _check_targets(session, scope, kind, value_kw)
    rid = f"{prefix}-{ident or uuid.uuid4().hex}"
    # no start: "now" at first arrival; a redelivery must not move it (submit keeps it)
    req = ControlRequest(rid, source, kind, scope, start or now, expiry, value_kw=value_kw,
                         issued_at=now, reason=reason, actor=actor)
    stored, created = persistence.submit(session, req, actor=actor,
                                         start_defaulted=start is None)
    return Applied(requests=[stored], created=created)


def apply_adms(session: Session, msg: Any, *, actor: str, now: datetime) -> Applied:
    """Store (and audit) what a validated ADMS message asks, in ``session``'s transaction."""
    if isinstance(msg, Withdraw):
        req, changed = persistence.withdraw(session, msg.request_id, now, actor=actor,
                                            reason=msg.reason, sources=[Source.ADMS])
        return Applied(requests=[req], withdrawn=[req.request_id] if changed else [])
    if isinstance(msg, Switching):
        return _switching(session, msg, actor=actor, now=now)
    value = getattr(msg, "limit_kw", None)
    return _request(session, prefix="adms", ident=msg.message_id, source=Source.ADMS,
                    kind=CommandKind(msg.type), scope=msg.scope.scope(), value_kw=value,
                    start=msg.start, expiry=msg.expiry, reason=msg.reason, actor=actor,
                    now=now)


def _same_event(row: dict[str, Any]) -> Select[tuple[int]]:
    """The query for the id of the topology event with ``row``'s key."""
    return select(TopologyEvent.id).where(
        *(getattr(TopologyEvent, c) == row[c] for c in TOPOLOGY_EVENT_KEY))


def _store_event(session: Session, row: dict[str, Any]) -> tuple[int, bool]:
    """The id of the topology event ``row`` (its key and nothing else) and whether this
    call stored it. An insert that meets the same event stored by another transaction
    meanwhile (on PostgreSQL after waiting for its commit) does nothing and reads that
    one's id, as a repeat would."""
    found = session.scalar(_same_event(row))
    if found is not None:
        return found, False
    new = session.scalar(upsert_insert(session.connection(), TopologyEvent).values(**row)
                         .on_conflict_do_nothing(index_elements=list(TOPOLOGY_EVENT_KEY))
                         .returning(TopologyEvent.id))
    if new is not None:
        return new, True
    return session.scalars(_same_event(row)).one(), False


def _switching(session: Session, msg: Switching, *, actor: str, now: datetime) -> Applied:
    """Store the switch states not stored yet (a repeat answers with the stored ids).
    Inserted in key order (switch, then state): two messages with the same switches in
    other orders would each wait on the other's insert, a deadlock on PostgreSQL. (A
    message listing a switch in both states is refused by :class:`Switching`.)"""
    if session.get(Feeder, msg.feeder_id) is None:
        raise UnknownTarget(f"unknown feeder {msg.feeder_id!r}")
    rows = [{"feeder_id": msg.feeder_id, "switch": sw.switch.strip().lower(),  # as OpenDSS
             "t": msg.t, "state": SwitchState(sw.state), "source": "adms"}  # names it
            for sw in msg.switches]
    order = sorted(range(len(rows)), key=lambda k: (rows[k]["switch"], rows[k]["state"].value))
    stored = {k: _store_event(session, rows[k]) for k in order}
    out = Applied(topology_event_ids=[stored[k][0] for k in range(len(rows))])
    new = [{"switch": r["switch"], "state": r["state"].value}
           for k, r in enumerate(rows) if stored[k][1]]
    if new:
        out.feeders_switched.append(msg.feeder_id)
        out.created = True
        append_audit(session, actor=actor, action="switching", entity="feeder",
                     entity_id=msg.feeder_id,
                     detail={"t": msg.t.isoformat(), "switches": new,
                             "message_id": msg.message_id, "reason": msg.reason})
    if msg.expiry is not None:
        abn = _request(session, prefix="adms", ident=msg.message_id, source=Source.ADMS,
                       kind=CommandKind.ABNORMAL_CONFIGURATION,
                       scope=Scope.feeder(msg.feeder_id), value_kw=None, start=msg.t,
                       expiry=msg.expiry, reason=msg.reason or "switching", actor=actor,
                       now=now)
        out.requests, out.created = abn.requests, out.created or abn.created
    return out


def apply_override(session: Session, body: OperatorOverrideIn, *, actor: str,
                   now: datetime) -> Applied:
    """Store (and audit) an operator override."""
    return _request(session, prefix="op", ident=body.override_id, source=Source.OPERATOR,
                    kind=CommandKind(body.kind), scope=body.scope.scope(),
                    value_kw=body.value_kw, start=body.start, expiry=body.expiry,
                    reason=body.reason, actor=actor, now=now)


__all__ = ["AdmsMessage", "Applied", "MessageError", "OperatorOverrideIn", "ScopeIn",
           "UnknownTarget", "apply_adms", "apply_override", "parse_adms"]
