"""Protocol-neutral device commands of the control loop and where they go (pure data).

A :class:`DeviceCommand` is one decision for one DER: an active-power setpoint or limit
(and optionally a reactive-power setpoint) valid over ``[valid_from, valid_until)`` (aware
UTC), with the reason and the cycle that decided it. Sign convention (DESIGN.md): ``p_kw``
is the device's net **import** at its terminals (``> 0`` consuming or charging, ``< 0``
generating or discharging); ``q_kvar`` likewise (``> 0`` absorbing).

``mode`` says how an adapter should express it:

* ``p_setpoint``: hold ``p_kw`` (IEEE 2030.5 ``opModFixedW``; a battery);
* ``export_limit``: generate at most ``-p_kw`` (``p_kw <= 0``; CSIP-AUS ``opModExpLimW``,
  2030.5 ``opModMaxLimW`` for a PV inverter): the device may export less (clouds);
* ``import_limit``: consume at most ``p_kw`` (``p_kw >= 0``; ``opModImpLimW``; an EV
  charger).

``command_id`` is the command's identity (the IEEE 2030.5 mRID of the DERControl it
becomes): one decision, one id; re-sending the same command keeps its id (DESIGN.md
"Commands").

:class:`CommandSink` is the protocol-neutral outlet (the IEEE 2030.5 adapter will
implement it); :class:`InMemorySink` keeps what it is given (tests, benchmarks, the digital
twin).
"""

from __future__ import annotations

import enum
import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from derms.errors import InputError
from derms.store.types import ensure_utc


class CommandMode(enum.StrEnum):
    """How the active-power value of a command is to be applied (module docstring)."""

    P_SETPOINT = "p_setpoint"
    EXPORT_LIMIT = "export_limit"
    IMPORT_LIMIT = "import_limit"
    RELEASE = "release"  # no DERMS control: the device's own / default behaviour (a block)


def command_id(cycle_id: str, der_id: str) -> str:
    """Deterministic id of the command a cycle issues to a DER (32 hex digits, an mRID)."""
    return hashlib.sha256(f"{cycle_id}\x1f{der_id}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class DeviceCommand:
    """One command to one DER (module docstring for signs and kinds)."""

    command_id: str
    der_id: str
    cycle_id: str
    mode: CommandMode
    p_kw: float
    valid_from: datetime
    valid_until: datetime
    reason: str
    q_kvar: float | None = None

    def __post_init__(self) -> None:
        if not self.der_id or not self.command_id:
            raise InputError("device command: der_id and command_id are required")
        mode = CommandMode(self.mode)
        object.__setattr__(self, "mode", mode)
        start = ensure_utc(self.valid_from, f"command {self.command_id} valid_from")
        end = ensure_utc(self.valid_until, f"command {self.command_id} valid_until")
        if end <= start:
            raise InputError(f"command {self.command_id} for {self.der_id}: valid_until "
                             f"{end.isoformat()} is not after valid_from {start.isoformat()}")
        object.__setattr__(self, "valid_from", start)
        object.__setattr__(self, "valid_until", end)
        if not math.isfinite(self.p_kw) or (self.q_kvar is not None
                                            and not math.isfinite(self.q_kvar)):
            raise InputError(f"command for {self.der_id}: p_kw {self.p_kw} / q_kvar "
                             f"{self.q_kvar} must be finite")
        if mode is CommandMode.EXPORT_LIMIT and self.p_kw > 1e-9:
            raise InputError(f"command for {self.der_id}: an export limit needs p_kw <= 0, "
                             f"got {self.p_kw}")
        if mode is CommandMode.IMPORT_LIMIT and self.p_kw < -1e-9:
            raise InputError(f"command for {self.der_id}: an import limit needs p_kw >= 0, "
                             f"got {self.p_kw}")

    def active_at(self, t: datetime) -> bool:
        return self.valid_from <= t < self.valid_until

    def to_dict(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "der_id": self.der_id,
                "cycle_id": self.cycle_id, "mode": self.mode.value, "p_kw": self.p_kw,
                "q_kvar": self.q_kvar, "valid_from": self.valid_from.isoformat(),
                "valid_until": self.valid_until.isoformat(), "reason": self.reason}


@runtime_checkable
class CommandSink(Protocol):
    """Where the control loop hands its commands (a protocol adapter, a queue, a test).

    ``send`` takes one cycle's commands in one call (adapters batch per aggregator or
    per notification) and returns how many it accepted; it must not block the cycle on
    the network (queue and return).
    """

    def send(self, commands: Sequence[DeviceCommand]) -> int: ...


class InMemorySink:
    """Keeps every command it is sent, in order; the latest per DER in :attr:`latest`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.commands: list[DeviceCommand] = []
        self.latest: dict[str, DeviceCommand] = {}

    def send(self, commands: Sequence[DeviceCommand]) -> int:
        with self._lock:
            self.commands.extend(commands)
            for c in commands:
                self.latest[c.der_id] = c
        return len(commands)

    def active(self, t: datetime) -> dict[str, DeviceCommand]:
        """The latest command per DER that is valid at ``t``."""
        t = ensure_utc(t, "t")
        return {d: c for d, c in self.latest.items() if c.active_at(t)}

    def __len__(self) -> int:
        return len(self.commands)


class CommandIssuer:
    """Turns one cycle's new DER setpoints into commands, one decision one command.

    Mode by DER kind (module docstring): "pv" → export limit (when ``p_kw <= 0``), "ev" →
    import limit (when ``p_kw >= 0``), anything else a setpoint. A DER whose last command
    has the same mode and values (within ``deadband_kw``) and stays valid past the next
    cycle (``period_s``) gets none; every command is valid ``hold_s`` from ``now``.
    """

    def __init__(self, hold_s: float, period_s: float, deadband_kw: float) -> None:
        if hold_s <= 0 or period_s <= 0 or deadband_kw < 0:
            raise InputError("command issuer: hold_s and period_s > 0, deadband_kw >= 0")
        self.hold, self.period = timedelta(seconds=hold_s), timedelta(seconds=period_s)
        self.deadband_kw = deadband_kw
        self.last: dict[str, DeviceCommand] = {}

    def seed(self, commands: Sequence[DeviceCommand], now: datetime) -> int:
        """Take ``commands`` (e.g. the tracked commands of a previous run) as the last
        command of their DERs where they are still valid at ``now`` (the latest
        ``valid_from`` per DER wins); returns how many DERs got one. Expired ones are
        ignored: nothing that has ended is re-sent or held on to."""
        now = ensure_utc(now, "now")
        n = 0
        for cmd in sorted(commands, key=lambda c: c.valid_from):
            if cmd.valid_until > now:
                n += cmd.der_id not in self.last
                self.last[cmd.der_id] = cmd
        return n

    def issue_as(self, now: datetime, cycle_id: str, der_id: str, mode: CommandMode,
                 p_kw: float, until: datetime, reason: str) -> DeviceCommand | None:
        """A command of an explicit ``mode`` valid until ``until`` (a higher authority's:
        an operator's setpoint, an ADMS limit, a block's release), unless the DER's last
        command already says the same for at least as long; returns it (remembered)."""
        now, until = ensure_utc(now, "now"), ensure_utc(until, "until")
        if until <= now:
            return None
        old = self.last.get(der_id)
        if (old is not None and old.mode is mode and old.valid_until >= until
                and old.valid_from <= now and abs(old.p_kw - p_kw) < self.deadband_kw):
            return None
        cmd = DeviceCommand(command_id(cycle_id, der_id), der_id, cycle_id, mode, float(p_kw),
                            now, until, reason)
        self.last[der_id] = cmd
        return cmd

    def issue(self, now: datetime, cycle_id: str, der_id: Sequence[str], kind: Sequence[str],
              p_kw: Sequence[float], q_kvar: Sequence[float], reasons: Sequence[str]
              ) -> list[DeviceCommand]:
        """Commands for DERs ``der_id`` to take ``p_kw`` (and ``q_kvar``; NaN = no Q
        setpoint), net import; returns the new ones (also remembered as the last)."""
        now = ensure_utc(now, "now")
        until, refresh = now + self.hold, now + self.period
        out = []
        for der, k, p, q, why in zip(der_id, kind, p_kw, q_kvar, reasons):
            p = float(p)
            q_out = None if math.isnan(q) else float(q)
            mode = (CommandMode.EXPORT_LIMIT if k == "pv" and p <= 0 else
                    CommandMode.IMPORT_LIMIT if k == "ev" and p >= 0 else CommandMode.P_SETPOINT)
            old = self.last.get(der)
            if (old is not None and old.valid_until > refresh and old.mode is mode
                    and abs(old.p_kw - p) < self.deadband_kw
                    and (old.q_kvar is None) == (q_out is None)
                    and (q_out is None or abs(old.q_kvar - q_out) < self.deadband_kw)):
                continue
            cmd = DeviceCommand(command_id(cycle_id, der), der, cycle_id, mode, p, now, until,
                                why, q_out)
            self.last[der] = cmd
            out.append(cmd)
        return out


__all__ = ["CommandIssuer", "CommandMode", "CommandSink", "DeviceCommand", "InMemorySink",
           "command_id"]
