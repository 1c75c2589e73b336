"""Where the IEEE 2030.5 server keeps its resources: an interface and an in-memory version.

The server only talks to :class:`SepRepository`; a database-backed implementation (derms.store)
can replace :class:`InMemoryRepository` without touching the HTTP side.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from derms.protocols.ieee2030_5.identity import sfdi_from_lfdi
from derms.protocols.ieee2030_5.model import (
    ControlRecord,
    ControlSpec,
    CurveRecord,
    DefaultControlRecord,
    DerLimits,
    EndDeviceRecord,
    FsaRecord,
    LogEventRecord,
    MirrorReadingRecord,
    MirrorUsagePointRecord,
    ProgramRecord,
    ResponseRecord,
    SubscriptionRecord,
    new_mrid,
)

#: DERControlBase curve mode → the DERCurveType its curve must have
MODE_CURVE_TYPES = {"opModFreqWatt": 0, "opModVoltVar": 11, "opModVoltWatt": 12}
MAX_CURVE_POINTS = 10  # DERCurve: CurveData 1..10
MAX_SUBSCRIPTIONS_PER_DEVICE = 64
MAX_LOG_EVENTS_KEPT = 10_000  # per end device (oldest dropped first)


class SepRepository(Protocol):
    """The storage the IEEE 2030.5 resources need (all methods thread-safe)."""

    def end_device(self, edev_id: int) -> EndDeviceRecord | None: ...
    def end_device_by_lfdi(self, lfdi: str) -> EndDeviceRecord | None: ...
    def end_devices_visible_to(self, lfdi: str) -> list[EndDeviceRecord]: ...
    def add_end_device(self, lfdi: str, *, pin: int | None = None, owner_lfdi: str | None = None,
                       nmi: str | None = None, fsa_ids: Sequence[int] = (),
                       der_id: str | None = None, meter_id: str | None = None
                       ) -> EndDeviceRecord: ...
    def touch_end_device(self, edev_id: int, changed_time: datetime) -> EndDeviceRecord: ...
    def is_aggregator(self, lfdi: str) -> bool: ...
    def fsa(self, fsa_id: int) -> FsaRecord | None: ...
    def program(self, program_id: int) -> ProgramRecord | None: ...
    def controls(self, program_id: int) -> list[ControlRecord]: ...
    def device_controls(self, program_id: int, edev_id: int, nmi: str | None
                        ) -> list[ControlRecord]: ...
    def audience_controls(self, keys: Sequence[tuple]) -> list[ControlRecord]: ...
    def default_control(self, program_id: int) -> DefaultControlRecord | None: ...
    def put_der_document(self, edev_id: int, kind: str, xml: bytes) -> bool: ...
    def der_document(self, edev_id: int, kind: str) -> tuple[bytes, datetime] | None: ...
    def control_by_mrid(self, mrid: str) -> ControlRecord | None: ...
    def add_response(self, control_id: int, edev_id: int, status: int | None,
                     created_time: datetime | None) -> tuple[ResponseRecord, bool]: ...
    def response(self, response_id: int) -> ResponseRecord | None: ...
    def responses(self, *, control_id: int | None = None,
                  edev_ids: Sequence[int] | None = None) -> list[ResponseRecord]: ...
    def add_mirror_usage_point(self, rec: MirrorUsagePointRecord
                               ) -> tuple[MirrorUsagePointRecord, bool]: ...
    def mirror_usage_point(self, mup_id: int) -> MirrorUsagePointRecord | None: ...
    def mirror_usage_points(self, edev_ids: Sequence[int] | None = None
                            ) -> list[MirrorUsagePointRecord]: ...
    def add_mirror_readings(self, mup_id: int, readings: Sequence[MirrorReadingRecord]
                            ) -> MirrorUsagePointRecord: ...
    def curve(self, curve_id: int) -> CurveRecord | None: ...
    def curves(self, program_id: int) -> list[CurveRecord]: ...
    def add_log_event(self, rec: LogEventRecord) -> LogEventRecord: ...
    def log_events(self, edev_id: int) -> list[LogEventRecord]: ...
    def add_subscription(self, rec: SubscriptionRecord) -> tuple[SubscriptionRecord, bool]: ...
    def subscription(self, subscription_id: int) -> SubscriptionRecord | None: ...
    def subscriptions(self, edev_id: int | None = None) -> list[SubscriptionRecord]: ...
    def delete_subscription(self, subscription_id: int) -> bool: ...
    @property
    def version(self) -> int: ...


class SepAdminRepository(SepRepository, Protocol):
    """What the management API needs on top of what the server reads (operator writes and
    listings); all methods thread-safe, bad input a ValueError naming the item."""

    def add_end_devices(self, specs: Sequence[dict]
                        ) -> list[tuple[EndDeviceRecord, bool]]: ...
    def end_devices(self) -> list[EndDeviceRecord]: ...
    def end_devices_at(self, connection_point: str) -> list[EndDeviceRecord]: ...
    def add_aggregator(self, lfdi: str) -> None: ...
    def aggregators(self) -> list[str]: ...
    def assign_fsa(self, edev_id: int, fsa_id: int) -> None: ...
    def add_fsa(self, description: str, program_ids: Sequence[int] = ()) -> FsaRecord: ...
    def fsas(self) -> list[FsaRecord]: ...
    def add_program(self, description: str, primacy: int) -> ProgramRecord: ...
    def programs(self) -> list[ProgramRecord]: ...
    def add_controls(self, specs: Sequence[ControlSpec]) -> list[tuple[ControlRecord, bool]]: ...
    def control(self, control_id: int) -> ControlRecord | None: ...
    def cancel_control(self, control_id: int) -> ControlRecord: ...
    def set_default_control(self, program_id: int, limits: DerLimits, *,
                            description: str = "", set_grad_w: int | None = None
                            ) -> DefaultControlRecord: ...
    def add_curve(self, program_id: int, curve_type: int, x: Sequence[float],
                  y: Sequence[float], y_ref_type: int, *, description: str = "",
                  ramp_dec_tms: int | None = None, ramp_inc_tms: int | None = None,
                  ramp_pt1_tms: int | None = None) -> CurveRecord: ...


def audience_key(rec: ControlRecord) -> tuple:
    """(program, "edev", end device) / (program, "cp", connection point) / (program, "all",
    None): who sees a control."""
    if rec.edev_id is not None:
        return (rec.program_id, "edev", rec.edev_id)
    if rec.connection_point is not None:
        return (rec.program_id, "cp", rec.connection_point)
    return (rec.program_id, "all", None)


def _norm(lfdi: str) -> str:
    lfdi = lfdi.strip().upper()
    if len(lfdi) != 40 or any(c not in "0123456789ABCDEF" for c in lfdi):
        raise ValueError(f"LFDI {lfdi!r}: expected 40 hex digits")
    return lfdi


def _check_spec(spec: ControlSpec) -> None:
    if spec.start.tzinfo is None:
        raise ValueError("control start: must be timezone-aware")
    if not 0 <= spec.duration_s <= 2**32 - 1:
        raise ValueError(f"control duration {spec.duration_s} s: expected 0 .. 2^32-1")
    for name in ("randomize_start_s", "randomize_duration_s"):
        value = getattr(spec, name)
        if value is not None and not -32768 <= value <= 32767:  # OneHourRangeType (Int16)
            raise ValueError(f"{name} {value}: expected -32768 .. 32767")
    if spec.edev_id is not None and spec.connection_point is not None:
        raise ValueError("a control targets one end device or one connection point, not both")
    if spec.mrid is not None and (len(spec.mrid) != 32 or any(
            c not in "0123456789ABCDEFabcdef" for c in spec.mrid)):
        raise ValueError(f"mRID {spec.mrid!r}: expected 32 hex digits")
    for name in ("exp_lim_w", "imp_lim_w", "gen_lim_w", "load_lim_w"):
        value = getattr(spec.limits, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} {value!r}: expected a finite value >= 0 W")
    target = spec.limits.target_w
    if target is not None and not math.isfinite(target):
        raise ValueError(f"target_w {target!r}: expected a finite value in W")


def check_curve(curve_type: int, x: Sequence[float], y: Sequence[float], y_ref_type: int,
                ramps: Sequence[int | None]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate a DERCurve's points (ValueError naming the problem); returns them as floats."""
    if not 0 <= curve_type <= 14:
        raise ValueError(f"curveType {curve_type}: expected 0..14 (DERCurveType)")
    if not 0 <= y_ref_type <= 7:
        raise ValueError(f"yRefType {y_ref_type}: expected 0..7 (DERUnitRefType)")
    xs, ys = tuple(float(v) for v in x), tuple(float(v) for v in y)
    if not 1 <= len(xs) <= MAX_CURVE_POINTS or len(xs) != len(ys):
        raise ValueError(f"curve points: expected 1..{MAX_CURVE_POINTS} x values and as many "
                         f"y values, got {len(xs)} and {len(ys)}")
    if not all(math.isfinite(v) and abs(v) < 2e7 for v in xs + ys):
        raise ValueError("curve points: every x and y must be finite and below 2e7 in size")
    if any(b <= a for a, b in itertools.pairwise(xs)):
        raise ValueError(f"curve x values {list(xs)}: must increase strictly")
    for value in ramps:
        if value is not None and not 0 <= value <= 65535:
            raise ValueError(f"ramp time {value}: expected 0..65535 hundredths of a second")
    return xs, ys


def _content_of_spec(spec: ControlSpec) -> tuple:
    return (spec.program_id, spec.edev_id, spec.connection_point, spec.start.astimezone(UTC),
            spec.duration_s, spec.randomize_start_s, spec.randomize_duration_s, spec.limits)


def _content(rec: ControlRecord) -> tuple:
    return (rec.program_id, rec.edev_id, rec.connection_point, rec.start, rec.duration_s,
            rec.randomize_start_s, rec.randomize_duration_s, rec.limits)


class InMemoryRepository:
    """Everything in dictionaries behind one lock (this increment; the database comes next)."""

    def __init__(self, pen: int = 0) -> None:
        self._lock = threading.RLock()  # re-entered by batch methods
        self._pen = pen
        self._edevs: dict[int, EndDeviceRecord] = {}
        self._aggregators: set[str] = set()
        self._fsas: dict[int, FsaRecord] = {}
        self._programs: dict[int, ProgramRecord] = {}
        self._controls: dict[int, ControlRecord] = {}
        self._defaults: dict[int, DefaultControlRecord] = {}
        self._control_mrids: dict[str, int] = {}
        #: control ids by audience: (program, "all", None), (program, "edev", id),
        #: (program, "cp", connection point)
        self._audience: dict[tuple[int, str, object], list[int]] = {}
        self._der_docs: dict[tuple[int, str], tuple[bytes, datetime]] = {}
        self._responses: dict[int, ResponseRecord] = {}
        self._response_keys: dict[tuple[int, int, int | None], int] = {}
        self._mups: dict[int, MirrorUsagePointRecord] = {}
        self._mup_mrids: dict[str, int] = {}
        self._curves: dict[int, CurveRecord] = {}
        self._log_events: dict[int, list[LogEventRecord]] = {}
        self._subscriptions: dict[int, SubscriptionRecord] = {}
        self._next = {"edev": 1, "fsa": 1, "program": 1, "control": 1, "response": 1,
                      "mup": 1, "curve": 1, "log": 1, "sub": 1}
        self._version = 0
        #: (version, keys changed) of the recent changes (see :meth:`changes_since`)
        self._change_log: deque[tuple[int, frozenset | None]] = deque(maxlen=4096)

    @property
    def version(self) -> int:
        """Grows with every change of what the server publishes (end devices, function
        sets, programs, controls, default controls): rendered documents may be cached until
        it changes."""
        return self._version

    def _changed(self, keys: Iterable[tuple] | None = None) -> None:  # lock held
        """A published change: ``keys`` names what changed — ``("controls", program,
        audience kind, value)`` or ``("default", program)`` — None: possibly anything."""
        self._version += 1
        self._change_log.append((self._version, None if keys is None else frozenset(keys)))

    def changes_since(self, version: int) -> frozenset | None:
        """What changed after ``version`` (see :meth:`_changed`): the union of the keys, or
        None when something unkeyed changed or the log no longer reaches back that far.
        Lets the notifier re-render only the subscriptions a change can touch."""
        with self._lock:
            if version >= self._version:
                return frozenset()
            entries = [(v, k) for v, k in self._change_log if v > version]
            if not entries or entries[0][0] != version + 1:
                return None
            out: set = set()
            for _, keys in entries:
                if keys is None:
                    return None
                out |= keys
            return frozenset(out)

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
                       nmi: str | None = None, fsa_ids: Sequence[int] = (),
                       der_id: str | None = None, meter_id: str | None = None
                       ) -> EndDeviceRecord:
        """Pre-register (operator) or register (client) an end device; one per LFDI.
        ``der_id`` / ``meter_id``: the derms.store DER device / meter its mirrored
        telemetry is stored under (see :class:`EndDeviceRecord`)."""
        lfdi = _norm(lfdi)
        owner = _norm(owner_lfdi) if owner_lfdi else None
        if owner == lfdi:
            raise ValueError(f"end device {lfdi}: cannot be its own aggregator")
        if nmi is not None and not 0 < len(nmi) <= 32:
            raise ValueError(f"connection point id {nmi!r}: expected 1..32 characters")
        if pin is not None and not 0 <= pin <= 2**32 - 1:
            raise ValueError(f"PIN {pin}: expected 0 .. 2^32-1")
        for name, value in (("der_id", der_id), ("meter_id", meter_id)):
            if value is not None and not 0 < len(value) <= 64:
                raise ValueError(f"{name} {value!r}: expected 1..64 characters")
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
                                  owner_lfdi=owner, nmi=nmi, fsa_ids=tuple(fsa_ids),
                                  der_id=der_id, meter_id=meter_id)
            self._edevs[rec.edev_id] = rec
            self._changed()
            if owner is not None:  # the client that owns registered devices is an aggregator
                self._aggregators.add(owner)
            return rec

    def add_end_devices(self, specs: Sequence[dict]) -> list[tuple[EndDeviceRecord, bool]]:
        """Pre-register many end devices at once, all or nothing: each spec holds
        :meth:`add_end_device`'s arguments (``lfdi`` plus keywords). An LFDI already
        registered is returned as it is (``created`` False); a bad spec is a ValueError
        naming its position and nothing is added."""
        seen: set[str] = set()
        for k, spec in enumerate(specs):
            try:
                lfdi = _norm(spec["lfdi"])
            except (KeyError, ValueError) as exc:
                raise ValueError(f"end device {k}: {exc}") from None
            if lfdi in seen:
                raise ValueError(f"end device {k}: LFDI {lfdi} given twice")
            seen.add(lfdi)
        with self._lock:
            out: list[tuple[EndDeviceRecord, bool]] = []
            for k, spec in enumerate(specs):
                old = self.end_device_by_lfdi(spec["lfdi"])
                if old is not None:
                    out.append((old, False))
                    continue
                args = {key: value for key, value in spec.items() if key != "lfdi"}
                try:
                    out.append((self.add_end_device(spec["lfdi"], **args), True))
                except (TypeError, ValueError) as exc:
                    self._undo_new_end_devices(out)
                    raise ValueError(f"end device {k}: {exc}") from None
            return out

    def _undo_new_end_devices(self, done: list[tuple[EndDeviceRecord, bool]]) -> None:
        """Take back the end devices a failed batch added (lock held)."""
        for rec, created in done:
            if created:
                self._edevs.pop(rec.edev_id, None)
        self._changed()

    def end_devices(self) -> list[EndDeviceRecord]:
        with self._lock:
            return sorted(self._edevs.values(), key=lambda e: e.edev_id)

    def end_devices_at(self, connection_point: str) -> list[EndDeviceRecord]:
        """End devices registered at a CSIP-AUS connection point (NMI), by id."""
        with self._lock:
            return sorted((e for e in self._edevs.values() if e.nmi == connection_point),
                          key=lambda e: e.edev_id)

    def touch_end_device(self, edev_id: int, changed_time: datetime) -> EndDeviceRecord:
        with self._lock:
            rec = dataclasses.replace(self._edevs[edev_id], changed_time=changed_time)
            self._edevs[edev_id] = rec
            self._changed()
            return rec

    def add_aggregator(self, lfdi: str) -> None:
        """Mark a client certificate's LFDI as an aggregator's (it may register others)."""
        with self._lock:
            self._aggregators.add(_norm(lfdi))

    def is_aggregator(self, lfdi: str) -> bool:
        with self._lock:
            return lfdi.upper() in self._aggregators

    def aggregators(self) -> list[str]:
        with self._lock:
            return sorted(self._aggregators)

    def assign_fsa(self, edev_id: int, fsa_id: int) -> None:
        with self._lock:
            if fsa_id not in self._fsas:
                raise ValueError(f"function set assignment {fsa_id}: unknown")
            if edev_id not in self._edevs:
                raise ValueError(f"end device {edev_id}: unknown")
            rec = self._edevs[edev_id]
            if fsa_id not in rec.fsa_ids:
                self._edevs[edev_id] = dataclasses.replace(rec, fsa_ids=(*rec.fsa_ids, fsa_id))
                self._changed()

    # --- function sets, programs, controls ------------------------------------------------------
    def add_fsa(self, description: str, program_ids: Sequence[int] = ()) -> FsaRecord:
        with self._lock:
            missing = [p for p in program_ids if p not in self._programs]
            if missing:
                raise ValueError(f"DER program {missing[0]}: unknown")
            rec = FsaRecord(self._id("fsa"), new_mrid(self._pen), description, tuple(program_ids))
            self._fsas[rec.fsa_id] = rec
            self._changed()
            return rec

    def fsa(self, fsa_id: int) -> FsaRecord | None:
        with self._lock:
            return self._fsas.get(fsa_id)

    def fsas(self) -> list[FsaRecord]:
        with self._lock:
            return sorted(self._fsas.values(), key=lambda f: f.fsa_id)

    def add_program(self, description: str, primacy: int) -> ProgramRecord:
        if not 0 <= primacy <= 255:
            raise ValueError(f"primacy {primacy}: expected 0..255")
        with self._lock:
            rec = ProgramRecord(self._id("program"), new_mrid(self._pen), description, primacy)
            self._programs[rec.program_id] = rec
            self._changed()
            return rec

    def program(self, program_id: int) -> ProgramRecord | None:
        with self._lock:
            return self._programs.get(program_id)

    def programs(self) -> list[ProgramRecord]:
        with self._lock:
            return sorted(self._programs.values(), key=lambda p: p.program_id)

    def add_control(self, program_id: int, start: datetime, duration_s: int, limits: DerLimits,
                    *, description: str = "", edev_id: int | None = None,
                    connection_point: str | None = None, randomize_start_s: int | None = None,
                    randomize_duration_s: int | None = None,
                    mrid: str | None = None) -> ControlRecord:
        """Add one DERControl (see :meth:`add_controls`)."""
        spec = ControlSpec(program_id, start, duration_s, limits, description, edev_id,
                           connection_point, randomize_start_s, randomize_duration_s, mrid)
        return self.add_controls([spec])[0][0]

    def add_controls(self, specs: Sequence[ControlSpec]) -> list[tuple[ControlRecord, bool]]:
        """Add DERControls, all or nothing: each ``(record, created)``.

        A spec whose mRID is already stored with the same content (program, audience, start,
        duration, randomisation, limits) returns the stored record with ``created`` False, so
        publishing the same controls twice stores them once; the same mRID with other content
        is a ValueError (an mRID names one event)."""
        for spec in specs:
            _check_spec(spec)
        now = datetime.now(UTC).replace(microsecond=0)
        with self._lock:
            out: list[tuple[ControlRecord, bool]] = []
            new: dict[str, ControlRecord] = {}
            next_id = self._next["control"]
            for spec in specs:
                if spec.program_id not in self._programs:
                    raise ValueError(f"DER program {spec.program_id}: unknown")
                if spec.edev_id is not None and spec.edev_id not in self._edevs:
                    raise ValueError(f"end device {spec.edev_id}: unknown")
                self._check_curves(spec.program_id, spec.limits)
                mrid = spec.mrid.upper() if spec.mrid else new_mrid(self._pen)
                old = new.get(mrid) or self._controls.get(self._control_mrids.get(mrid, -1))
                if old is not None:
                    if _content(old) != _content_of_spec(spec):
                        raise ValueError(f"DERControl mRID {mrid}: already used for another "
                                         "control")
                    out.append((old, False))
                    continue
                rec = ControlRecord(next_id, spec.program_id, mrid, spec.start.astimezone(UTC),
                                    spec.duration_s, spec.limits, creation_time=now,
                                    description=spec.description, edev_id=spec.edev_id,
                                    connection_point=spec.connection_point,
                                    randomize_start_s=spec.randomize_start_s,
                                    randomize_duration_s=spec.randomize_duration_s)
                next_id += 1
                new[mrid] = rec
                out.append((rec, True))
            self._next["control"] = next_id
            for mrid, rec in new.items():
                self._controls[rec.control_id] = rec
                self._control_mrids[mrid] = rec.control_id
                self._audience.setdefault(audience_key(rec), []).append(rec.control_id)
            if new:
                self._changed({("controls", *audience_key(r)) for r in new.values()})
            return out

    def control(self, control_id: int) -> ControlRecord | None:
        with self._lock:
            return self._controls.get(control_id)

    def forget_controls_ended_before(self, t: datetime) -> int:
        """Drop from memory the controls whose interval ended before ``t`` and their
        responses (a database-backed repository keeps them stored); returns how many.
        Keeps memory bounded when envelopes are published every few minutes (1,000
        connection points x 288 five-minute intervals = 288,000 controls a day). A dropped
        control's mRID can no longer be matched for idempotent re-publishing."""
        cutoff = t.timestamp()
        with self._lock:
            gone = {i for i, c in self._controls.items()
                    if c.start.timestamp() + c.duration_s < cutoff}
            if not gone:
                return 0
            keys = set()
            for i in gone:
                rec = self._controls.pop(i)
                self._control_mrids.pop(rec.mrid, None)
                keys.add(("controls", *audience_key(rec)))
            for key, ids in list(self._audience.items()):
                kept = [i for i in ids if i not in gone]
                if kept:
                    self._audience[key] = kept
                else:
                    del self._audience[key]
            for rid in [r for r, rec in self._responses.items() if rec.control_id in gone]:
                rec = self._responses.pop(rid)
                self._response_keys.pop((rec.control_id, rec.edev_id, rec.status), None)
            self._changed(keys)
            return len(gone)

    def cancel_control(self, control_id: int) -> ControlRecord:
        """Cancel an event (IEEE 2030.5 EventStatus 2); it stays listed until its end."""
        with self._lock:
            rec = self._controls.get(control_id)
            if rec is None:
                raise KeyError(f"DERControl {control_id}: unknown")
            if rec.cancelled_time is None:
                rec = dataclasses.replace(rec, cancelled_time=datetime.now(UTC).replace(
                    microsecond=0), version=(rec.version + 1) % 65536)
                self._controls[control_id] = rec
                self._changed({("controls", *audience_key(rec))})
            return rec

    def controls(self, program_id: int) -> list[ControlRecord]:
        with self._lock:
            return [c for c in self._controls.values() if c.program_id == program_id]

    def audience_controls(self, keys: Sequence[tuple]) -> list[ControlRecord]:
        """The controls of the given audiences (:func:`audience_key` values)."""
        with self._lock:
            return [self._controls[i] for k in keys for i in self._audience.get(tuple(k), ())]

    def device_controls(self, program_id: int, edev_id: int, nmi: str | None
                        ) -> list[ControlRecord]:
        """The program's controls an end device sees: program-wide ones, its own and its
        connection point's (by index, not by scanning every control)."""
        keys = [(program_id, "all", None), (program_id, "edev", edev_id)]
        if nmi is not None:
            keys.append((program_id, "cp", nmi))
        with self._lock:
            return [self._controls[i] for k in keys for i in self._audience.get(k, ())]

    def set_default_control(self, program_id: int, limits: DerLimits, *,
                            description: str = "", set_grad_w: int | None = None
                            ) -> DefaultControlRecord:
        with self._lock:
            if program_id not in self._programs:
                raise ValueError(f"DER program {program_id}: unknown")
            self._check_curves(program_id, limits)
            old = self._defaults.get(program_id)
            rec = DefaultControlRecord(program_id, old.mrid if old else new_mrid(self._pen),
                                       limits, description,
                                       version=(old.version + 1) % 65536 if old else 0,
                                       set_grad_w=set_grad_w)
            self._defaults[program_id] = rec
            self._changed({("default", program_id)})
            return rec

    def default_control(self, program_id: int) -> DefaultControlRecord | None:
        with self._lock:
            return self._defaults.get(program_id)

    # --- DER curves (volt-var, volt-watt, freq-watt, …) ---------------------------------------------
    def _check_curves(self, program_id: int, limits: DerLimits) -> None:  # lock held
        for tag, curve_id in limits.curve_ids().items():
            curve = self._curves.get(curve_id)
            if curve is None or curve.program_id != program_id:
                raise ValueError(f"{tag}: DERCurve {curve_id} is not a curve of DER program "
                                 f"{program_id}")
            if curve.curve_type != MODE_CURVE_TYPES[tag]:
                raise ValueError(f"{tag}: DERCurve {curve_id} has curveType "
                                 f"{curve.curve_type}, expected {MODE_CURVE_TYPES[tag]}")

    def add_curve(self, program_id: int, curve_type: int, x: Sequence[float],
                  y: Sequence[float], y_ref_type: int, *, description: str = "",
                  ramp_dec_tms: int | None = None, ramp_inc_tms: int | None = None,
                  ramp_pt1_tms: int | None = None) -> CurveRecord:
        """Add a DERCurve to a program (curves are immutable: a new shape is a new curve)."""
        xs, ys = check_curve(curve_type, x, y, y_ref_type,
                             (ramp_dec_tms, ramp_inc_tms, ramp_pt1_tms))
        with self._lock:
            if program_id not in self._programs:
                raise ValueError(f"DER program {program_id}: unknown")
            rec = CurveRecord(self._id("curve"), program_id, new_mrid(self._pen), curve_type,
                              xs, ys, y_ref_type, datetime.now(UTC).replace(microsecond=0),
                              description, x_multiplier=-2, y_multiplier=-2,
                              ramp_dec_tms=ramp_dec_tms, ramp_inc_tms=ramp_inc_tms,
                              ramp_pt1_tms=ramp_pt1_tms)
            self._curves[rec.curve_id] = rec
            self._changed()
            return rec

    def curve(self, curve_id: int) -> CurveRecord | None:
        with self._lock:
            return self._curves.get(curve_id)

    def curves(self, program_id: int) -> list[CurveRecord]:
        with self._lock:
            return sorted((c for c in self._curves.values() if c.program_id == program_id),
                          key=lambda c: c.curve_id)

    # --- log events and subscriptions (client-created) ----------------------------------------------
    def add_log_event(self, rec: LogEventRecord) -> LogEventRecord:
        """Store a LogEvent a device POSTed (``rec.log_event_id`` is assigned)."""
        with self._lock:
            if rec.edev_id not in self._edevs:
                raise ValueError(f"end device {rec.edev_id}: unknown")
            rec = dataclasses.replace(rec, log_event_id=self._id("log"),
                                      received_time=datetime.now(UTC))
            kept = self._log_events.setdefault(rec.edev_id, [])
            kept.append(rec)
            if len(kept) > MAX_LOG_EVENTS_KEPT:
                del kept[:len(kept) - MAX_LOG_EVENTS_KEPT]
            return rec

    def log_events(self, edev_id: int) -> list[LogEventRecord]:
        """A device's log events, newest first (IEEE 2030.5 LogEventList order)."""
        with self._lock:
            return sorted(self._log_events.get(edev_id, ()),
                          key=lambda r: (r.created_time, r.log_event_id), reverse=True)

    def add_subscription(self, rec: SubscriptionRecord) -> tuple[SubscriptionRecord, bool]:
        """Store a Subscription (id assigned): ``(stored, created)``. The same end device,
        resource and notification URI again renews the stored one (limit and level
        updated, ``created`` False); more than MAX_SUBSCRIPTIONS_PER_DEVICE is a
        ValueError."""
        with self._lock:
            if rec.edev_id not in self._edevs:
                raise ValueError(f"end device {rec.edev_id}: unknown")
            mine = [r for r in self._subscriptions.values() if r.edev_id == rec.edev_id]
            old = next((r for r in mine if r.subscribed_resource == rec.subscribed_resource
                        and r.notification_uri == rec.notification_uri), None)
            if old is not None:
                new = dataclasses.replace(old, limit=rec.limit, level=rec.level,
                                          encoding=rec.encoding)
                self._subscriptions[old.subscription_id] = new
                return new, False
            if len(mine) >= MAX_SUBSCRIPTIONS_PER_DEVICE:
                raise ValueError(f"end device {rec.edev_id}: already has "
                                 f"{MAX_SUBSCRIPTIONS_PER_DEVICE} subscriptions")
            new = dataclasses.replace(rec, subscription_id=self._id("sub"),
                                      created_time=datetime.now(UTC).replace(microsecond=0))
            self._subscriptions[new.subscription_id] = new
            return new, True

    def subscription(self, subscription_id: int) -> SubscriptionRecord | None:
        with self._lock:
            return self._subscriptions.get(subscription_id)

    def subscriptions(self, edev_id: int | None = None) -> list[SubscriptionRecord]:
        with self._lock:
            return sorted((r for r in self._subscriptions.values()
                           if edev_id is None or r.edev_id == edev_id),
                          key=lambda r: r.subscription_id)

    def delete_subscription(self, subscription_id: int) -> bool:
        with self._lock:
            return self._subscriptions.pop(subscription_id, None) is not None

    # --- what clients PUT: DERCapability, DERSettings, DERStatus, DERAvailability ---------------
    def put_der_document(self, edev_id: int, kind: str, xml: bytes) -> bool:
        """Store a validated document a client PUT (replacing the last); True when it is the
        first of its kind for that end device."""
        now = datetime.now(UTC)
        with self._lock:
            if edev_id not in self._edevs:
                raise ValueError(f"end device {edev_id}: unknown")
            created = (edev_id, kind) not in self._der_docs
            self._der_docs[(edev_id, kind)] = (xml, now)
            return created

    def der_document(self, edev_id: int, kind: str) -> tuple[bytes, datetime] | None:
        """The last document of ``kind`` the end device PUT, and when."""
        with self._lock:
            return self._der_docs.get((edev_id, kind))

    # --- responses to events ----------------------------------------------------------------------
    def control_by_mrid(self, mrid: str) -> ControlRecord | None:
        with self._lock:
            return self._controls.get(self._control_mrids.get(mrid.upper(), -1))

    def add_response(self, control_id: int, edev_id: int, status: int | None,
                     created_time: datetime | None) -> tuple[ResponseRecord, bool]:
        """Store a device's response to an event; the same (event, device, status) again
        returns the stored one (``created`` False): clients retry."""
        with self._lock:
            control = self._controls.get(control_id)
            edev = self._edevs.get(edev_id)
            if control is None or edev is None:
                raise ValueError(f"DERControl {control_id} / end device {edev_id}: unknown")
            key = (control_id, edev_id, status)
            if key in self._response_keys:
                return self._responses[self._response_keys[key]], False
            rec = ResponseRecord(self._id("response"), control_id, control.mrid, edev_id,
                                 edev.lfdi, status, created_time, datetime.now(UTC))
            self._responses[rec.response_id] = rec
            self._response_keys[key] = rec.response_id
            return rec, True

    def response(self, response_id: int) -> ResponseRecord | None:
        with self._lock:
            return self._responses.get(response_id)

    def responses(self, *, control_id: int | None = None,
                  edev_ids: Sequence[int] | None = None) -> list[ResponseRecord]:
        """Responses by id, optionally of one event and/or some end devices."""
        wanted = None if edev_ids is None else set(edev_ids)
        with self._lock:
            return [r for r in self._responses.values()
                    if (control_id is None or r.control_id == control_id)
                    and (wanted is None or r.edev_id in wanted)]

    # --- metering mirror (§10.11) ------------------------------------------------------------------
    def add_mirror_usage_point(self, rec: MirrorUsagePointRecord
                               ) -> tuple[MirrorUsagePointRecord, bool]:
        """Store a MirrorUsagePoint a client POSTed (``rec.mup_id`` is ignored; one is
        assigned): ``(stored, created)``. The same mRID again from the same creator and for
        the same end device updates it (new MirrorMeterReadings added, ``created`` False);
        from another client it is a PermissionError (IEEE 2030.5-2023 §10.11.3 rule e);
        a known reading mRID with another ReadingType is a ValueError."""
        with self._lock:
            if rec.edev_id not in self._edevs:
                raise ValueError(f"end device {rec.edev_id}: unknown")
            old_id = self._mup_mrids.get(rec.mrid)
            if old_id is None:
                new = dataclasses.replace(rec, mup_id=self._id("mup"),
                                          created_time=datetime.now(UTC).replace(microsecond=0))
                self._mups[new.mup_id] = new
                self._mup_mrids[new.mrid] = new.mup_id
                return new, True
            old = self._mups[old_id]
            if old.creator_lfdi != rec.creator_lfdi or old.edev_id != rec.edev_id:
                raise PermissionError(f"MirrorUsagePoint {rec.mrid}: created by another "
                                      "client")
            merged = self._merge_readings(old, rec.readings)
            merged = dataclasses.replace(merged, post_rate_s=rec.post_rate_s or old.post_rate_s,
                                         description=rec.description or old.description,
                                         status=rec.status, role_flags=rec.role_flags)
            self._mups[old_id] = merged
            return merged, False

    @staticmethod
    def _merge_readings(mup: MirrorUsagePointRecord, readings: Sequence[MirrorReadingRecord]
                        ) -> MirrorUsagePointRecord:
        known = {r.mrid: r for r in mup.readings}
        added = []
        for r in readings:
            old = known.get(r.mrid) or next((a for a in added if a.mrid == r.mrid), None)
            if old is None:
                added.append(r)
            elif old.reading_type != r.reading_type:
                raise ValueError(f"MirrorMeterReading {r.mrid}: its ReadingType cannot "
                                 "change")
        return dataclasses.replace(mup, readings=(*mup.readings, *added)) if added else mup

    def add_mirror_readings(self, mup_id: int, readings: Sequence[MirrorReadingRecord]
                            ) -> MirrorUsagePointRecord:
        """Register further MirrorMeterReadings (with their ReadingType) on a MUP."""
        with self._lock:
            mup = self._mups.get(mup_id)
            if mup is None:
                raise KeyError(f"MirrorUsagePoint {mup_id}: unknown")
            mup = self._merge_readings(mup, readings)
            self._mups[mup_id] = mup
            return mup

    def mirror_usage_point(self, mup_id: int) -> MirrorUsagePointRecord | None:
        with self._lock:
            return self._mups.get(mup_id)

    def mirror_usage_points(self, edev_ids: Sequence[int] | None = None
                            ) -> list[MirrorUsagePointRecord]:
        """MirrorUsagePoints by id, optionally only those of some end devices."""
        wanted = None if edev_ids is None else set(edev_ids)
        with self._lock:
            return [m for m in self._mups.values() if wanted is None or m.edev_id in wanted]
