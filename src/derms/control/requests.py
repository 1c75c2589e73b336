"""Control requests: who asks the DERMS to do what, where, and until when (pure data).

A :class:`ControlRequest` comes from one :class:`Source` (safety, ADMS, operator,
optimisation), has one :class:`CommandKind`, applies to one scope (a feeder, a section of
a feeder, a connection point or a device) during ``[start, expiry)`` (aware UTC; the
expiry is mandatory), and may be withdrawn earlier.

Sign conventions (DESIGN.md):

* ``limit_export`` / ``limit_import``: ``value_kw >= 0`` is a magnitude. An export limit
  ``E`` means the net import at the scope must stay ``>= -E``; an import limit ``I``
  means it must stay ``<= I``. On a feeder or a section it is an *aggregate* limit (the
  sum over everything in the scope), on a connection point a site limit (CSIP-AUS
  ``opModExpLimW`` / ``opModImpLimW``), on a device a limit of that device alone.
* ``operator_setpoint`` / ``optimisation_setpoint``: ``value_kw`` is the device's active
  power, **import-positive** at its terminals: ``> 0`` consuming or charging, ``< 0``
  generating or discharging (``p_kw = p_charge_kw - p_gen_kw``).

What the DERMS never commands: regulators, capacitors and switches stay with the ADMS.
There is no command kind and no scope for them, so no request can ask for it; topology
reaches the DERMS only as reported switch states (:class:`derms.store.models.TopologyEvent`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from derms.errors import InputError
from derms.grid.elements import bus_of
from derms.store.types import ensure_utc


class Source(enum.StrEnum):
    """Who asks; earlier members take precedence (``PRECEDENCE``)."""

    SAFETY = "safety"
    ADMS = "adms"
    OPERATOR = "operator"
    OPTIMISATION = "optimisation"


PRECEDENCE: tuple[Source, ...] = (Source.SAFETY, Source.ADMS, Source.OPERATOR,
                                  Source.OPTIMISATION)
"""Highest first: a request of an earlier source overrides one of a later source."""


def rank(source: Source) -> int:
    """0 for the highest authority (safety), 3 for the lowest (optimisation)."""
    return PRECEDENCE.index(source)


class CommandKind(enum.StrEnum):
    """What a request asks. Deliberately no switch, regulator or capacitor kind."""

    BLOCK_DISPATCH = "block_dispatch"
    LIMIT_EXPORT = "limit_export"
    LIMIT_IMPORT = "limit_import"
    ABNORMAL_CONFIGURATION = "abnormal_configuration"
    OPERATOR_SETPOINT = "operator_setpoint"
    OPTIMISATION_SETPOINT = "optimisation_setpoint"


LIMIT_KINDS = frozenset({CommandKind.LIMIT_EXPORT, CommandKind.LIMIT_IMPORT})
SETPOINT_KINDS = frozenset({CommandKind.OPERATOR_SETPOINT, CommandKind.OPTIMISATION_SETPOINT})

ALLOWED: dict[Source, frozenset[CommandKind]] = {
    Source.SAFETY: frozenset({CommandKind.BLOCK_DISPATCH, *LIMIT_KINDS}),
    Source.ADMS: frozenset({CommandKind.BLOCK_DISPATCH, *LIMIT_KINDS,
                            CommandKind.ABNORMAL_CONFIGURATION}),
    Source.OPERATOR: frozenset({CommandKind.BLOCK_DISPATCH, *LIMIT_KINDS,
                                CommandKind.OPERATOR_SETPOINT}),
    Source.OPTIMISATION: frozenset({*LIMIT_KINDS, CommandKind.OPTIMISATION_SETPOINT}),
}
"""Which source may ask which kind (a setpoint kind belongs to exactly one source)."""


class ScopeKind(enum.StrEnum):
    FEEDER = "feeder"
    SECTION = "section"
    CONNECTION_POINT = "connection_point"
    DEVICE = "device"


def normalise_bus(bus: str) -> str:
    """Bus name as OpenDSS reports it: lower case, without node suffixes (``671.1.2`` → ``671``;
    :func:`derms.grid.elements.bus_of`, the one implementation)."""
    return bus_of(bus)


def _ident(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise InputError(f"{name}: a non-empty id of at most 200 characters is required, "
                         f"got {value!r}")
    return value.strip()


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a request applies.

    ``kind`` feeder: ``feeder_id``. Section: ``feeder_id``, ``section_id`` (the ADMS's
    name of the switch zone) and its ``buses`` (OpenDSS names; a device is in the section
    when it sits on one of them). Connection point: ``connection_point`` (the DER site id
    of the store, the 2030.5 connection point). Device: ``der_id``.
    Build with the class methods; ``from_dict`` reads the JSON form.
    """

    kind: ScopeKind
    feeder_id: str | None = None
    section_id: str | None = None
    buses: frozenset[str] = field(default_factory=frozenset)
    connection_point: str | None = None
    der_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ScopeKind):
            try:
                object.__setattr__(self, "kind", ScopeKind(self.kind))
            except ValueError:
                raise InputError(f"scope kind {self.kind!r} unknown; expected one of "
                                 f"{', '.join(k.value for k in ScopeKind)}") from None
        need = {ScopeKind.FEEDER: ("feeder_id",),
                ScopeKind.SECTION: ("feeder_id", "section_id"),
                ScopeKind.CONNECTION_POINT: ("connection_point",),
                ScopeKind.DEVICE: ("der_id",)}[self.kind]
        for name in ("feeder_id", "section_id", "connection_point", "der_id"):
            value = getattr(self, name)
            if name in need:
                object.__setattr__(self, name, _ident(value, f"{self.kind.value} scope {name}"))
            elif value is not None:
                raise InputError(f"{self.kind.value} scope: {name} does not apply "
                                 f"(got {value!r})")
        buses = frozenset(normalise_bus(_ident(b, "section bus")) for b in self.buses)
        if self.kind is ScopeKind.SECTION and not buses:
            raise InputError(f"section {self.section_id!r}: give its buses (none given)")
        if self.kind is not ScopeKind.SECTION and buses:
            raise InputError(f"{self.kind.value} scope: buses apply to sections only")
        object.__setattr__(self, "buses", buses)

    @classmethod
    def feeder(cls, feeder_id: str) -> Scope:
        return cls(ScopeKind.FEEDER, feeder_id=feeder_id)

    @classmethod
    def section(cls, feeder_id: str, section_id: str, buses: Any) -> Scope:
        if isinstance(buses, str):
            raise InputError(f"section {section_id!r}: buses must be a list, got a string")
        return cls(ScopeKind.SECTION, feeder_id=feeder_id, section_id=section_id,
                   buses=frozenset(buses))

    @classmethod
    def point(cls, connection_point: str) -> Scope:
        return cls(ScopeKind.CONNECTION_POINT, connection_point=connection_point)

    @classmethod
    def device(cls, der_id: str) -> Scope:
        return cls(ScopeKind.DEVICE, der_id=der_id)

    @property
    def target(self) -> str:
        """One string naming what the scope covers (``feeder:f1``, ``section:f1/z3``…)."""
        if self.kind is ScopeKind.FEEDER:
            return f"feeder:{self.feeder_id}"
        if self.kind is ScopeKind.SECTION:
            return f"section:{self.feeder_id}/{self.section_id}"
        if self.kind is ScopeKind.CONNECTION_POINT:
            return f"connection_point:{self.connection_point}"
        return f"device:{self.der_id}"

    def covers(self, loc: DeviceLocation) -> bool:
        """Whether a device at ``loc`` is inside this scope."""
        if self.kind is ScopeKind.DEVICE:
            return loc.der_id == self.der_id
        if self.kind is ScopeKind.CONNECTION_POINT:
            return loc.connection_point == self.connection_point
        if loc.feeder_id != self.feeder_id:
            return False
        return self.kind is ScopeKind.FEEDER or (loc.bus is not None and loc.bus in self.buses)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value}
        for name in ("feeder_id", "section_id", "connection_point", "der_id"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.kind is ScopeKind.SECTION:
            out["buses"] = sorted(self.buses)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Scope:
        if not isinstance(data, dict):
            raise InputError(f"scope: expected an object, got {data!r}")
        known = {"kind", "feeder_id", "section_id", "buses", "connection_point", "der_id"}
        extra = sorted(set(data) - known)
        if extra:
            raise InputError(f"scope: unknown field(s) {', '.join(extra)}")
        buses = data.get("buses") or ()
        if isinstance(buses, str):
            raise InputError("scope buses: expected a list of bus names, got a string")
        return cls(data.get("kind"), feeder_id=data.get("feeder_id"),  # type: ignore[arg-type]
                   section_id=data.get("section_id"), buses=frozenset(buses),
                   connection_point=data.get("connection_point"), der_id=data.get("der_id"))


@dataclass(frozen=True, slots=True)
class DeviceLocation:
    """Where a device is: its feeder, bus (normalised) and connection point (site id)."""

    der_id: str
    feeder_id: str | None = None
    bus: str | None = None
    connection_point: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "der_id", _ident(self.der_id, "device location der_id"))
        if self.bus is not None:
            object.__setattr__(self, "bus", normalise_bus(self.bus))


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """One request (module docstring: sources, kinds, sign conventions).

    ``value_kw``: the limit (``>= 0``) for limit kinds, the import-positive setpoint for
    setpoint kinds, None otherwise. Active in ``[start, min(expiry, withdrawn_at))``.
    ``issued_at`` (default ``start``) is when the source issued it: optimisation
    setpoints issued before an abnormal configuration began were planned on the normal
    topology and do not apply during it.
    """

    request_id: str
    source: Source
    kind: CommandKind
    scope: Scope
    start: datetime
    expiry: datetime
    value_kw: float | None = None
    issued_at: datetime | None = None
    reason: str = ""
    actor: str = ""
    withdrawn_at: datetime | None = None

    def __post_init__(self) -> None:
        rid = _ident(self.request_id, "request_id")
        if len(rid) > 64:
            raise InputError(f"request_id {rid!r}: at most 64 characters")
        object.__setattr__(self, "request_id", rid)
        try:
            source = Source(self.source)
        except ValueError:
            raise InputError(f"request {rid}: source {self.source!r} unknown; expected one "
                             f"of {', '.join(s.value for s in Source)}") from None
        try:
            kind = CommandKind(self.kind)
        except ValueError:
            raise InputError(
                f"request {rid}: kind {self.kind!r} unknown; expected one of "
                f"{', '.join(k.value for k in CommandKind)} (the DERMS never commands "
                "switches, regulators or capacitors)") from None
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "kind", kind)
        if not isinstance(self.scope, Scope):
            raise InputError(f"request {rid}: scope must be a Scope, got {self.scope!r}")
        if kind not in ALLOWED[source]:
            raise InputError(f"request {rid}: source {source.value} may not ask "
                             f"{kind.value}")
        start = ensure_utc(self.start, f"request {rid} start")
        expiry = ensure_utc(self.expiry, f"request {rid} expiry")
        if expiry <= start:
            raise InputError(f"request {rid}: expiry {expiry.isoformat()} is not after "
                             f"start {start.isoformat()}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "expiry", expiry)
        issued = start if self.issued_at is None else ensure_utc(self.issued_at,
                                                                 f"request {rid} issued_at")
        object.__setattr__(self, "issued_at", issued)
        if self.withdrawn_at is not None:
            object.__setattr__(self, "withdrawn_at",
                               ensure_utc(self.withdrawn_at, f"request {rid} withdrawn_at"))
        self._check_value(rid, kind)
        if kind in SETPOINT_KINDS and self.scope.kind is not ScopeKind.DEVICE:
            raise InputError(f"request {rid}: {kind.value} applies to one device "
                             f"(scope kind device), got {self.scope.kind.value}")
        if (kind is CommandKind.ABNORMAL_CONFIGURATION
                and self.scope.kind not in (ScopeKind.FEEDER, ScopeKind.SECTION)):
            raise InputError(f"request {rid}: abnormal_configuration applies to a feeder "
                             f"or a section, got {self.scope.kind.value}")

    def _check_value(self, rid: str, kind: CommandKind) -> None:
        value = self.value_kw
        if kind in LIMIT_KINDS or kind in SETPOINT_KINDS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InputError(f"request {rid}: {kind.value} needs value_kw (a number), "
                                 f"got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"request {rid}: value_kw {value!r} is not finite")
            if kind in LIMIT_KINDS and value < 0:
                raise InputError(f"request {rid}: {kind.value} value_kw {value} kW is "
                                 "negative; limits are magnitudes >= 0")
            object.__setattr__(self, "value_kw", float(value))
        elif value is not None:
            raise InputError(f"request {rid}: {kind.value} takes no value_kw (got {value!r})")

    @property
    def end(self) -> datetime:
        """When it stops applying: the expiry, or the withdrawal if earlier."""
        if self.withdrawn_at is not None and self.withdrawn_at < self.expiry:
            return self.withdrawn_at
        return self.expiry

    def active_at(self, t: datetime) -> bool:
        """Whether it applies at ``t`` (aware): ``start <= t < end``."""
        return self.start <= t < self.end

    def to_dict(self) -> dict[str, Any]:
        """JSON form (times ISO 8601 UTC) for the API and the audit log."""
        return {
            "request_id": self.request_id, "source": self.source.value,
            "kind": self.kind.value, "scope": self.scope.to_dict(),
            "value_kw": self.value_kw, "start": self.start.isoformat(),
            "expiry": self.expiry.isoformat(),
            "issued_at": self.issued_at.isoformat() if self.issued_at else None,
            "withdrawn_at": self.withdrawn_at.isoformat() if self.withdrawn_at else None,
            "reason": self.reason, "actor": self.actor,
        }

    def same_content(self, other: ControlRequest) -> bool:
        """Equal apart from bookkeeping (actor, withdrawal): an idempotent resend."""
        keys = ("source", "kind", "scope", "start", "expiry", "value_kw", "reason")
        return all(getattr(self, k) == getattr(other, k) for k in keys)
