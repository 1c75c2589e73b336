"""Where the IEEE 2030.5 server keeps its resources: an interface and an in-memory version.

The server only talks to :class:`SepRepository`; a database-backed implementation (derms.store)
can replace :class:`InMemoryRepository` without touching the HTTP side.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from derms.protocols.ieee2030_5.identity import sfdi_from_lfdi
from derms.protocols.ieee2030_5.model import (
    ControlRecord,
    DefaultControlRecord,
    DerLimits,
    EndDeviceRecord,
    FsaRecord,
    ProgramRecord,
    new_mrid,
)


class SepRepository(Protocol):
    """The storage the IEEE 2030.5 resources need (all methods thread-safe)."""

    def end_device(self, edev_id: int) -> EndDeviceRecord | None: ...
    def end_device_by_lfdi(self, lfdi: str) -> EndDeviceRecord | None: ...
    def end_devices_visible_to(self, lfdi: str) -> list[EndDeviceRecord]: ...
    def add_end_device(self, lfdi: str, *, pin: int | None = None, owner_lfdi: str | None = None,
                       nmi: str | None = None, fsa_ids: Sequence[int] = ()) -> EndDeviceRecord: ...
    def touch_end_device(self, edev_id: int, changed_time: datetime) -> EndDeviceRecord: ...
    def is_aggregator(self, lfdi: str) -> bool: ...
    def fsa(self, fsa_id: int) -> FsaRecord | None: ...
    def program(self, program_id: int) -> ProgramRecord | None: ...
    def controls(self, program_id: int) -> list[ControlRecord]: ...
    def default_control(self, program_id: int) -> DefaultControlRecord | None: ...


def _norm(lfdi: str) -> str:
    lfdi = lfdi.strip().upper()
    if len(lfdi) != 40 or any(c not in "0123456789ABCDEF" for c in lfdi):
        raise ValueError(f"LFDI {lfdi!r}: expected 40 hex digits")
    return lfdi


class InMemoryRepository:
    """Everything in dictionaries behind one lock (this increment; the database comes next)."""

    def __init__(self, pen: int = 0) -> None:
        self._lock = threading.Lock()
        self._pen = pen
        self._edevs: dict[int, EndDeviceRecord] = {}
        self._aggregators: set[str] = set()
        self._fsas: dict[int, FsaRecord] = {}
        self._programs: dict[int, ProgramRecord] = {}
        self._controls: dict[int, ControlRecord] = {}
        self._defaults: dict[int, DefaultControlRecord] = {}
        self._next = {"edev": 1, "fsa": 1, "program": 1, "control": 1}

    def _id(self, kind: str) -> int:
        value = self._next[kind]
        self._next[kind] = value + 1
        return value

    # --- end devices -------------------------------------------------------------------------
    def end_device(self, edev_id: int) -> EndDeviceRecord | None:
        with self._lock:
            return self._edevs.get(edev_id)

    def end_device_by_lfdi(self, lfdi: str) -> EndDeviceRecord | None:
        lfdi = lfdi.upper()
        with self._lock:
            return next((e for e in self._edevs.values() if e.lfdi == lfdi), None)

    def end_devices_visible_to(self, lfdi: str) -> list[EndDeviceRecord]:
        """The client's own EndDevice and those it registered (as an aggregator), by id."""
        lfdi = lfdi.upper()
        with self._lock:
            return sorted((e for e in self._edevs.values()
                           if e.lfdi == lfdi or e.owner_lfdi == lfdi), key=lambda e: e.edev_id)

    def add_end_device(self, lfdi: str, *, pin: int | None = None, owner_lfdi: str | None = None,
                       nmi: str | None = None, fsa_ids: Sequence[int] = ()) -> EndDeviceRecord:
        """Pre-register (operator) or register (client) an end device; one per LFDI."""
        lfdi = _norm(lfdi)
        now = datetime.now(UTC).replace(microsecond=0)
        with self._lock:
            if any(e.lfdi == lfdi for e in self._edevs.values()):
                raise ValueError(f"end device {lfdi}: already registered")
            missing = [f for f in fsa_ids if f not in self._fsas]
            if missing:
                raise ValueError(f"function set assignment {missing[0]}: unknown")
            rec = EndDeviceRecord(edev_id=self._id("edev"), lfdi=lfdi, sfdi=sfdi_from_lfdi(lfdi),
                                  changed_time=now, pin=pin,
                                  registered_time=now if pin is not None else None,
                                  owner_lfdi=_norm(owner_lfdi) if owner_lfdi else None, nmi=nmi,
                                  fsa_ids=tuple(fsa_ids))
            self._edevs[rec.edev_id] = rec
            return rec

    def touch_end_device(self, edev_id: int, changed_time: datetime) -> EndDeviceRecord:
        with self._lock:
            rec = dataclasses.replace(self._edevs[edev_id], changed_time=changed_time)
            self._edevs[edev_id] = rec
            return rec

    def add_aggregator(self, lfdi: str) -> None:
        """Mark a client certificate's LFDI as an aggregator's (it may register others)."""
        with self._lock:
            self._aggregators.add(_norm(lfdi))

    def is_aggregator(self, lfdi: str) -> bool:
        with self._lock:
            return lfdi.upper() in self._aggregators

    def assign_fsa(self, edev_id: int, fsa_id: int) -> None:
        with self._lock:
            if fsa_id not in self._fsas:
                raise ValueError(f"function set assignment {fsa_id}: unknown")
            rec = self._edevs[edev_id]
            if fsa_id not in rec.fsa_ids:
                self._edevs[edev_id] = dataclasses.replace(rec, fsa_ids=(*rec.fsa_ids, fsa_id))

    # --- function sets, programs, controls ------------------------------------------------------
    def add_fsa(self, description: str, program_ids: Sequence[int] = ()) -> FsaRecord:
        with self._lock:
            missing = [p for p in program_ids if p not in self._programs]
            if missing:
                raise ValueError(f"DER program {missing[0]}: unknown")
            rec = FsaRecord(self._id("fsa"), new_mrid(self._pen), description, tuple(program_ids))
            self._fsas[rec.fsa_id] = rec
            return rec

    def fsa(self, fsa_id: int) -> FsaRecord | None:
        with self._lock:
            return self._fsas.get(fsa_id)

    def add_program(self, description: str, primacy: int) -> ProgramRecord:
        if not 0 <= primacy <= 255:
            raise ValueError(f"primacy {primacy}: expected 0..255")
        with self._lock:
            rec = ProgramRecord(self._id("program"), new_mrid(self._pen), description, primacy)
            self._programs[rec.program_id] = rec
            return rec

    def program(self, program_id: int) -> ProgramRecord | None:
        with self._lock:
            return self._programs.get(program_id)

    def add_control(self, program_id: int, start: datetime, duration_s: int, limits: DerLimits,
                    *, description: str = "", edev_id: int | None = None,
                    randomize_start_s: int | None = None,
                    randomize_duration_s: int | None = None) -> ControlRecord:
        if start.tzinfo is None:
            raise ValueError("control start: must be timezone-aware")
        if duration_s < 0:
            raise ValueError(f"control duration {duration_s} s: must be >= 0")
        with self._lock:
            if program_id not in self._programs:
                raise ValueError(f"DER program {program_id}: unknown")
            if edev_id is not None and edev_id not in self._edevs:
                raise ValueError(f"end device {edev_id}: unknown")
            rec = ControlRecord(self._id("control"), program_id, new_mrid(self._pen),
                                start.astimezone(UTC), duration_s, limits,
                                creation_time=datetime.now(UTC).replace(microsecond=0),
                                description=description, edev_id=edev_id,
                                randomize_start_s=randomize_start_s,
                                randomize_duration_s=randomize_duration_s)
            self._controls[rec.control_id] = rec
            return rec

    def controls(self, program_id: int) -> list[ControlRecord]:
        with self._lock:
            return [c for c in self._controls.values() if c.program_id == program_id]

    def set_default_control(self, program_id: int, limits: DerLimits, *,
                            description: str = "", set_grad_w: int | None = None
                            ) -> DefaultControlRecord:
        with self._lock:
            if program_id not in self._programs:
                raise ValueError(f"DER program {program_id}: unknown")
            old = self._defaults.get(program_id)
            rec = DefaultControlRecord(program_id, old.mrid if old else new_mrid(self._pen),
                                       limits, description,
                                       version=(old.version + 1) % 65536 if old else 0,
                                       set_grad_w=set_grad_w)
            self._defaults[program_id] = rec
            return rec

    def default_control(self, program_id: int) -> DefaultControlRecord | None:
        with self._lock:
            return self._defaults.get(program_id)
