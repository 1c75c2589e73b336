"""IEEE 2030.5 records ↔ rows of the ``sep_*`` tables (:mod:`derms.store.sep`): a record's
fields and its table's columns share their names (the exceptions are mapped here), and
everything stored is read back in id order (:func:`read_stored`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Table, select, update
from sqlalchemy.engine import Connection

from derms.protocols.ieee2030_5.model import (
    ControlRecord,
    CurveRecord,
    DefaultControlRecord,
    DerLimits,
    EndDeviceRecord,
    FsaRecord,
    LogEventRecord,
    MirrorReadingRecord,
    MirrorUsagePointRecord,
    ProgramRecord,
    ReadingTypeRecord,
    ResponseRecord,
    SubscriptionRecord,
)
from derms.store.sep import (
    SepAggregator,
    SepControl,
    SepCounter,
    SepCurve,
    SepDefaultControl,
    SepDerDocument,
    SepEndDevice,
    SepFsa,
    SepLogEvent,
    SepMirrorReading,
    SepMirrorUsagePoint,
    SepProgram,
    SepResponse,
    SepSubscription,
)

T = TypeVar("T")
EDEV, AGG, FSA, PROG = (SepEndDevice.__table__, SepAggregator.__table__, SepFsa.__table__,
                            SepProgram.__table__)
CTRL, DEF, CURVE, DOC = (SepControl.__table__, SepDefaultControl.__table__,
                             SepCurve.__table__, SepDerDocument.__table__)
RESP, MUP, READ = (SepResponse.__table__, SepMirrorUsagePoint.__table__,
                    SepMirrorReading.__table__)
LOG, SUB, CNT = SepLogEvent.__table__, SepSubscription.__table__, SepCounter.__table__

# --- one record ↔ one row ---------------------------------------------------------------------
def to_row(rec: Any, table: Table, **extra: Any) -> dict[str, Any]:
    """A record's fields that are columns of ``table``, and ``extra``."""
    values = {c.name: getattr(rec, c.name) for c in table.columns if hasattr(rec, c.name)}
    values.update(extra)
    return values


def limits_to_row(rec: Any, table: Table, **extra: Any) -> dict[str, Any]:
    """A (default) control's row: its fields and its limits' (DERControlBase)."""
    return to_row(rec, table, **to_row(rec.limits, table), **extra)


def from_row(cls: type[T], values: Any, **extra: Any) -> T:
    """A record of ``cls`` from a row's columns named as its fields, and ``extra``."""
    fields = {f.name: values[f.name] for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.init and f.name in values and f.name not in extra}
    return cls(**fields, **extra)


def limits_from_row(values: Any) -> DerLimits:
    return from_row(DerLimits, values)


def reading_row(mup_id: int, position: int, r: MirrorReadingRecord) -> dict[str, Any]:
    return to_row(r.reading_type, READ, mup_id=mup_id, position=position, mrid=r.mrid,
                  description=r.description)


def reading_rows(mup: MirrorUsagePointRecord, first: int) -> list[dict[str, Any]]:
    """Rows of a MUP's MirrorMeterReadings from position ``first`` on (only ever appended)."""
    return [reading_row(mup.mup_id, i, r) for i, r in enumerate(mup.readings) if i >= first]


def reading_from_row(values: Any) -> MirrorReadingRecord:
    return MirrorReadingRecord(values["mrid"], values["description"],
                               from_row(ReadingTypeRecord, values, xml=bytes(values["xml"])))


@dataclasses.dataclass
class Stored:
    """Everything in the ``sep_*`` tables, as records in id order."""

    edevs: list[EndDeviceRecord]
    aggregators: list[str]
    fsas: list[FsaRecord]
    programs: list[ProgramRecord]
    curves: list[CurveRecord]
    controls: list[ControlRecord]
    defaults: list[DefaultControlRecord]
    docs: dict[tuple[int, str], tuple[bytes, datetime]]
    responses: list[ResponseRecord]
    mups: list[MirrorUsagePointRecord]
    logs: list[LogEventRecord]
    subs: list[SubscriptionRecord]
    counters: dict[str, int]  # sep_counters


def read_stored(conn: Connection) -> Stored:
    """Read every stored resource."""
    def rows(table: Table, *order: str) -> Iterator[Any]:
        query = select(table).order_by(*(table.c[o] for o in order))
        return iter(conn.execute(query).mappings())

    edevs = [from_row(EndDeviceRecord, r, fsa_ids=tuple(r["fsa_ids"]))
             for r in rows(EDEV, "edev_id")]
    aggregators = [r["lfdi"] for r in rows(AGG, "lfdi")]
    fsas = [from_row(FsaRecord, r, program_ids=tuple(r["program_ids"]))
            for r in rows(FSA, "fsa_id")]
    programs = [from_row(ProgramRecord, r) for r in rows(PROG, "program_id")]
    curves = [from_row(CurveRecord, r, x=tuple(r["x"]), y=tuple(r["y"]))
              for r in rows(CURVE, "curve_id")]
    controls = [from_row(ControlRecord, r, limits=limits_from_row(r),
                         extra=dict(r["extra"] or {})) for r in rows(CTRL, "control_id")]
    defaults = [from_row(DefaultControlRecord, r, limits=limits_from_row(r))
                for r in rows(DEF, "program_id")]
    docs = {(r["edev_id"], r["kind"]): (bytes(r["xml"]), r["received_time"])
            for r in rows(DOC, "edev_id", "kind")}
    responses = [from_row(ResponseRecord, r) for r in rows(RESP, "response_id")]
    readings: dict[int, list[MirrorReadingRecord]] = {}
    for r in rows(READ, "mup_id", "position"):
        readings.setdefault(r["mup_id"], []).append(reading_from_row(r))
    mups = [from_row(MirrorUsagePointRecord, r, readings=tuple(readings.get(r["mup_id"], ())))
            for r in rows(MUP, "mup_id")]
    logs = [from_row(LogEventRecord, r) for r in rows(LOG, "log_event_id")]
    subs = [from_row(SubscriptionRecord, r, limit=r["item_limit"])
            for r in rows(SUB, "subscription_id")]
    counters = {r["name"]: r["value"] for r in rows(CNT, "name")}
    return Stored(edevs, aggregators, fsas, programs, curves, controls, defaults, docs,
                  responses, mups, logs, subs, counters)


def store_counters(conn: Connection, old: dict[str, int], new: dict[str, int]) -> None:
    """Update the counters whose value changed (``old``: as stored)."""
    for name, value in new.items():
        if name in old and old[name] != value:
            conn.execute(update(CNT).where(CNT.c.name == name).values(value=value))
