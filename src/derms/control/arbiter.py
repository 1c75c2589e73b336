"""The arbiter: which requests govern a device at time ``t``, and why (pure logic, no I/O).

Precedence is ``safety > ADMS > operator > optimisation`` (:data:`PRECEDENCE`); a request
applies only in ``[start, min(expiry, withdrawn_at))``. For one device the arbiter
resolves three things (sign conventions in :mod:`derms.control.requests`):

* **Block.** Any active ``block_dispatch`` covering the device blocks it: no setpoint is
  sent, the device follows its default control. A block overrides every setpoint of the
  same or a lower authority (an operator block also stops operator setpoints).
* **Setpoint** (device-scoped only). Setpoints not blocked compete: the highest authority
  wins; within one source the latest issued wins (then the latest start, then the
  larger request id: deterministic). An optimisation setpoint issued before an active
  abnormal configuration of its feeder or section began is *suppressed* (it was planned
  on the normal topology); one issued after it (a re-plan) applies.
* **Limits** (export, import), kept per target (the exact feeder, section, connection
  point or device they name): for each target the highest authority present wins, and
  within it the tightest value. Feeder and section limits are aggregate limits for the
  planner; device limits bound the device itself: a device limit of the same or higher
  authority than the winning setpoint *clamps* it; a lower-authority device limit the
  setpoint breaks is overridden by it. Connection-point limits are site limits (the
  site's other loads count too) and never clamp a device setpoint.

Every active request covering the device gets a :class:`Ruling`: applied, clamped,
overridden (by a higher authority), superseded (same authority: tighter, newer or
redundant) or suppressed (abnormal configuration), naming the request that decided it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from derms.control.requests import (
    PRECEDENCE,
    CommandKind,
    ControlRequest,
    DeviceLocation,
    ScopeKind,
    Source,
    rank,
)
from derms.errors import InputError
from derms.store.types import ensure_utc

APPLIED, CLAMPED, OVERRIDDEN, SUPERSEDED, SUPPRESSED = (
    "applied", "clamped", "overridden", "superseded", "suppressed")


class RequestConflict(InputError):
    """A request id reused with other content, or a withdrawal through the wrong path."""


@dataclass(frozen=True, slots=True)
class Ruling:
    """What became of one active request for one device, and which request decided it."""

    request_id: str
    source: Source
    kind: CommandKind
    target: str
    value_kw: float | None
    outcome: str
    by: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "source": self.source.value,
                "kind": self.kind.value, "target": self.target, "value_kw": self.value_kw,
                "outcome": self.outcome, "by": self.by, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class LimitDecision:
    """The winning limit of one direction on one target (``value_kw >= 0``, a magnitude)."""

    kind: CommandKind
    target: str
    scope_kind: ScopeKind
    value_kw: float
    request_id: str
    source: Source

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "target": self.target,
                "scope_kind": self.scope_kind.value, "value_kw": self.value_kw,
                "request_id": self.request_id, "source": self.source.value}


@dataclass(frozen=True, slots=True)
class Decision:
    """The effective command of one device at ``t``.

    ``setpoint_kw``: import-positive active power at the device (None: no setpoint; the
    device follows its default control), already clamped by device limits of equal or
    higher authority. ``limits``: the winning limit per (direction, target).
    """

    der_id: str
    t: datetime
    blocked: bool
    blocked_by: str | None
    setpoint_kw: float | None
    setpoint_by: str | None
    limits: tuple[LimitDecision, ...]
    abnormal_by: tuple[str, ...]
    rulings: tuple[Ruling, ...]

    def limit(self, kind: CommandKind, scope_kind: ScopeKind = ScopeKind.DEVICE) -> float | None:
        """The tightest winning limit of ``kind`` over targets of ``scope_kind``."""
        values = [lim.value_kw for lim in self.limits
                  if lim.kind is kind and lim.scope_kind is scope_kind]
        return min(values) if values else None

    def ruling(self, request_id: str) -> Ruling:
        for r in self.rulings:
            if r.request_id == request_id:
                return r
        raise KeyError(request_id)

    @property
    def reason(self) -> str:
        """One line saying what governs the device."""
        parts = []
        if self.blocked:
            parts.append(f"blocked by {self.blocked_by}")
        if self.setpoint_kw is not None:
            parts.append(f"setpoint {self.setpoint_kw:g} kW from {self.setpoint_by}")
        elif not self.blocked:
            parts.append("no setpoint (default control)")
        parts += [f"{lim.kind.value} {lim.value_kw:g} kW on {lim.target} from {lim.request_id}"
                  for lim in self.limits]
        if self.abnormal_by:
            parts.append("abnormal configuration: " + ", ".join(self.abnormal_by))
        return "; ".join(parts)

    def key(self) -> tuple:
        """What a device is told (for "did the decision change?"): not the explanations."""
        return (self.blocked, self.blocked_by, self.setpoint_kw, self.setpoint_by,
                tuple((lim.kind, lim.target, lim.value_kw, lim.request_id) for lim in self.limits),
                self.abnormal_by)

    def to_dict(self) -> dict[str, Any]:
        return {"der_id": self.der_id, "t": self.t.isoformat(), "blocked": self.blocked,
                "blocked_by": self.blocked_by, "setpoint_kw": self.setpoint_kw,
                "setpoint_by": self.setpoint_by,
                "limits": [lim.to_dict() for lim in self.limits],
                "abnormal_by": list(self.abnormal_by), "reason": self.reason,
                "rulings": [r.to_dict() for r in self.rulings]}


def _ruling(req: ControlRequest, outcome: str, by: str | None, reason: str) -> Ruling:
    return Ruling(req.request_id, req.source, req.kind, req.scope.target, req.value_kw,
                  outcome, by, reason)


def _newest_first(req: ControlRequest) -> tuple:
    return (rank(req.source), -req.issued_at.timestamp(), -req.start.timestamp(),
            _desc(req.request_id))


def _desc(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text) + (0,)


def _breaks(kind: CommandKind, setpoint_kw: float, limit_kw: float) -> bool:
    """Whether an import-positive setpoint breaks an export / import limit magnitude."""
    return setpoint_kw < -limit_kw if kind is CommandKind.LIMIT_EXPORT else setpoint_kw > limit_kw


def _clamp(kind: CommandKind, setpoint_kw: float, limit_kw: float) -> float:
    return max(setpoint_kw, -limit_kw) if kind is CommandKind.LIMIT_EXPORT else min(setpoint_kw,
                                                                                      limit_kw)


class Arbiter:
    """The set of known requests and the resolution of any device at any time.

    Holds no clock: every query takes ``t``. Not thread-safe (one owner; the store is the
    shared truth, see :mod:`derms.control.persistence`).
    """

    def __init__(self, requests: Iterable[ControlRequest] = ()) -> None:
        self._requests: dict[str, ControlRequest] = {}
        for req in requests:
            self.submit(req)

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def get(self, request_id: str) -> ControlRequest:
        try:
            return self._requests[request_id]
        except KeyError:
            raise InputError(f"unknown control request {request_id!r}") from None

    def requests(self) -> list[ControlRequest]:
        return sorted(self._requests.values(), key=lambda r: (r.start, r.request_id))

    def submit(self, req: ControlRequest) -> bool:
        """Add ``req``; True if new. The same id with the same content is an idempotent
        resend (False); with other content :class:`RequestConflict`."""
        if not isinstance(req, ControlRequest):
            raise InputError(f"expected a ControlRequest, got {type(req).__name__}")
        old = self._requests.get(req.request_id)
        if old is not None:
            if old.same_content(req):
                return False
            raise RequestConflict(f"control request {req.request_id!r} exists with other "
                                  "content; use a new id")
        self._requests[req.request_id] = req
        return True

    def withdraw(self, request_id: str, t: datetime) -> tuple[ControlRequest, bool]:
        """End ``request_id`` at ``t``; returns the request and whether this changed it
        (False when it had already ended: withdrawn or expired)."""
        t = ensure_utc(t, "withdrawal time")
        req = self.get(request_id)
        if req.end <= t or req.withdrawn_at is not None:
            return req, False
        new = replace(req, withdrawn_at=t)
        self._requests[request_id] = new
        return new, True

    def active(self, t: datetime) -> list[ControlRequest]:
        t = ensure_utc(t, "t")
        return [r for r in self.requests() if r.active_at(t)]

    def prune(self, t: datetime) -> list[ControlRequest]:
        """Forget the requests that ended at or before ``t`` and return them."""
        t = ensure_utc(t, "t")
        gone = [r for r in self.requests() if r.end <= t]
        for r in gone:
            del self._requests[r.request_id]
        return gone

    def resolve(self, loc: DeviceLocation, t: datetime) -> Decision:
        """The effective command of the device at ``loc`` at ``t`` (module docstring)."""
        if not isinstance(loc, DeviceLocation):
            raise InputError(f"expected a DeviceLocation, got {type(loc).__name__}")
        t = ensure_utc(t, "t")
        here = [r for r in self._requests.values() if r.active_at(t) and r.scope.covers(loc)]
        here.sort(key=_newest_first)
        rulings: dict[str, Ruling] = {}

        blocks = [r for r in here if r.kind is CommandKind.BLOCK_DISPATCH]
        block = blocks[0] if blocks else None  # highest authority, newest
        for r in blocks:
            rulings[r.request_id] = (
                _ruling(r, APPLIED, None, "blocks DER dispatch") if r is block else
                _ruling(r, SUPERSEDED, block.request_id, "already blocked"))

        abnormal = [r for r in here if r.kind is CommandKind.ABNORMAL_CONFIGURATION]
        latest_abnormal = max(abnormal, key=lambda r: (r.start, r.request_id), default=None)
        for r in abnormal:
            rulings[r.request_id] = _ruling(r, APPLIED, None, "feeder in abnormal configuration")

        setpoint_req, setpoint_kw = self._setpoint(here, block, latest_abnormal, rulings)
        limits = self._limits(here, rulings)
        limits, setpoint_kw = self._device_limits(limits, setpoint_req, setpoint_kw, rulings)
        return Decision(
            der_id=loc.der_id, t=t, blocked=block is not None,
            blocked_by=block.request_id if block else None, setpoint_kw=setpoint_kw,
            setpoint_by=setpoint_req.request_id if setpoint_req else None,
            limits=tuple(sorted(limits, key=lambda x: (x.kind.value, x.target))),
            abnormal_by=tuple(sorted(r.request_id for r in abnormal)),
            rulings=tuple(rulings[r.request_id] for r in here))

    def resolve_many(self, locations: Iterable[DeviceLocation], t: datetime) -> dict[str, Decision]:
        return {loc.der_id: self.resolve(loc, t) for loc in locations}

    @staticmethod
    def _setpoint(here: list[ControlRequest], block: ControlRequest | None,
                  abnormal: ControlRequest | None, rulings: dict[str, Ruling]
                  ) -> tuple[ControlRequest | None, float | None]:
        winner: ControlRequest | None = None
        for r in (r for r in here if r.kind in (CommandKind.OPERATOR_SETPOINT,
                                               CommandKind.OPTIMISATION_SETPOINT)):
            if block is not None and rank(block.source) <= rank(r.source):
                rulings[r.request_id] = _ruling(r, OVERRIDDEN, block.request_id,
                                                f"dispatch blocked by {block.source.value}")
            elif (abnormal is not None and r.source is Source.OPTIMISATION
                  and r.issued_at < abnormal.start):
                rulings[r.request_id] = _ruling(
                    r, SUPPRESSED, abnormal.request_id,
                    f"issued {r.issued_at.isoformat()}, before the abnormal configuration "
                    f"began at {abnormal.start.isoformat()}")
            elif winner is None:  # `here` is sorted: the first survivor wins
                winner = r
                rulings[r.request_id] = _ruling(r, APPLIED, None, "setpoint")
            else:
                same = r.source is winner.source
                rulings[r.request_id] = _ruling(
                    r, SUPERSEDED if same else OVERRIDDEN, winner.request_id,
                    f"a newer {winner.source.value} setpoint" if same else
                    f"{winner.source.value} takes precedence over {r.source.value}")
        return winner, (winner.value_kw if winner else None)

    @staticmethod
    def _limits(here: list[ControlRequest], rulings: dict[str, Ruling]) -> list[LimitDecision]:
        groups: dict[tuple[CommandKind, str], list[ControlRequest]] = {}
        for r in here:
            if r.kind in (CommandKind.LIMIT_EXPORT, CommandKind.LIMIT_IMPORT):
                groups.setdefault((r.kind, r.scope.target), []).append(r)
        out = []
        for (kind, target), reqs in groups.items():
            reqs.sort(key=lambda r: (rank(r.source), r.value_kw, r.request_id))
            win = reqs[0]
            out.append(LimitDecision(kind, target, win.scope.kind, float(win.value_kw or 0.0),
                                     win.request_id, win.source))
            rulings[win.request_id] = _ruling(win, APPLIED, None, f"{kind.value} on {target}")
            for r in reqs[1:]:
                same = r.source is win.source
                rulings[r.request_id] = _ruling(
                    r, SUPERSEDED if same else OVERRIDDEN, win.request_id,
                    f"tighter {kind.value} {win.value_kw:g} kW at the same level" if same else
                    f"{win.source.value} takes precedence over {r.source.value}")
        return out

    @staticmethod
    def _device_limits(limits: list[LimitDecision], sp: ControlRequest | None,
                       setpoint_kw: float | None, rulings: dict[str, Ruling]
                       ) -> tuple[list[LimitDecision], float | None]:
        if sp is None or setpoint_kw is None:
            return limits, setpoint_kw
        kept = []
        for lim in limits:
            if lim.scope_kind is not ScopeKind.DEVICE or not _breaks(lim.kind, setpoint_kw,
                                                                     lim.value_kw):
                kept.append(lim)
            elif rank(lim.source) <= rank(sp.source):
                setpoint_kw = _clamp(lim.kind, setpoint_kw, lim.value_kw)
                rulings[sp.request_id] = _ruling(
                    sp, CLAMPED, lim.request_id,
                    f"clamped to {setpoint_kw:g} kW by {lim.kind.value} {lim.value_kw:g} kW "
                    f"({lim.source.value})")
                kept.append(lim)
            else:
                req_ruling = rulings[lim.request_id]
                rulings[lim.request_id] = Ruling(
                    req_ruling.request_id, req_ruling.source, req_ruling.kind,
                    req_ruling.target, req_ruling.value_kw, OVERRIDDEN, sp.request_id,
                    f"{sp.source.value} setpoint {setpoint_kw:g} kW takes precedence over "
                    f"{lim.source.value}")
        return kept, setpoint_kw


__all__ = ["APPLIED", "CLAMPED", "OVERRIDDEN", "PRECEDENCE", "SUPERSEDED", "SUPPRESSED",
           "Arbiter", "Decision", "LimitDecision", "RequestConflict", "Ruling"]
