"""The IEEE 2030.5 resources kept in the database (``sep_*`` tables of :mod:`derms.store.sep`)
behind the in-memory repository the server reads.

:class:`PersistentRepository` loads every stored record into :class:`InMemoryRepository`'s
structures when it is built, so reads (what 1,000 polling clients ask for) never touch the
database, and writes every change through in one transaction:

- A write takes the repository's writer lock (one write at a time) and the database's write
  lock (an UPDATE of ``sep_counters``: on SQLite the one writer, on PostgreSQL a row lock)
  before it touches memory, so no reader waits while it waits behind another writer.
- Under the memory lock it runs :class:`InMemoryRepository`'s own method (validation and the
  change, unchanged code), notes in a journal the old and new value of every entry the change
  touched (each override knows which), and puts the old values back: readers keep seeing
  the committed state.
- Without the memory lock it writes the changed records, the id counters and the change
  counter, and commits; only then, under the memory lock again, memory takes the new values.
  If anything fails (validation, a constraint, the connection, the commit) memory stays as
  it was and the exception propagates. Readers never wait for the database and never see a
  change that is not committed.

Ids continue from ``sep_counters`` (the next id of each kind, kept with every write, so ids
of deleted subscriptions or dropped log events are never given again) or from the largest
stored id, whichever is larger. ``version`` continues from the stored change counter and
grows by one at every start, so it never repeats a value a renderer could have cached.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Connection, Engine

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
)
from derms.protocols.ieee2030_5.repository import InMemoryRepository, audience_key
from derms.protocols.ieee2030_5.sql_rows import (
    AGG,
    CNT,
    CTRL,
    CURVE,
    DEF,
    DOC,
    EDEV,
    FSA,
    LOG,
    MUP,
    PROG,
    READ,
    RESP,
    SUB,
    limits_to_row,
    read_stored,
    reading_rows,
    store_counters,
    to_row,
)

T = TypeVar("T")
_ABSENT = object()
#: InMemoryRepository's state this class loads and undoes (checked at construction)
_STATE = ("_lock", "_edevs", "_aggregators", "_fsas", "_programs", "_controls", "_defaults",
          "_control_mrids", "_audience", "_der_docs", "_responses", "_response_keys", "_mups",
          "_mup_mrids", "_curves", "_log_events", "_subscriptions", "_next", "_version")


class PersistentRepository(InMemoryRepository):
    """:class:`InMemoryRepository` whose every change is first committed to the database
    (``sep_*`` tables; the schema must be migrated, revision 0006 or later), and which starts
    from what is stored. Reads are served from memory."""

    def __init__(self, engine: Engine, pen: int = 0,
                 keep_ended_controls_s: float | None = None) -> None:
        """``keep_ended_controls_s``: load only controls that ended at most this long ago
        (and their responses); None loads every stored control. Older ones stay stored."""
        super().__init__(pen)
        self._keep_ended_s = keep_ended_controls_s
        missing = [name for name in _STATE if not hasattr(self, name)]
        if missing:  # InMemoryRepository changed: this class must follow
            raise TypeError(f"PersistentRepository: InMemoryRepository has no {missing}")
        self._lock = threading.RLock()  # re-entered by InMemoryRepository's methods
        self._engine = engine
        self._writer = threading.RLock()  # one write at a time (re-entered: nested writes)
        #: while a change runs: the entries it touched ([store, key, old value]) and the SQL
        #: of writes nested in it (None: no change running)
        self._journal: list[list[Any]] | None = None
        self._pending: list[Callable[[Connection], None]] = []
        self._load()

    # --- loading ---------------------------------------------------------------------------------
    def _load(self) -> None:
        with self._engine.begin() as conn:
            st = read_stored(conn)
            counters = st.counters
            with self._lock:
                self._edevs.update((e.edev_id, e) for e in st.edevs)
                self._aggregators.update(st.aggregators)
                self._fsas.update((f.fsa_id, f) for f in st.fsas)
                self._programs.update((p.program_id, p) for p in st.programs)
                self._curves.update((c.curve_id, c) for c in st.curves)
                cutoff = (-math.inf if self._keep_ended_s is None
                          else time.time() - self._keep_ended_s)
                skipped = {c.control_id for c in st.controls
                           if c.start.timestamp() + c.duration_s < cutoff}
                for c in st.controls:
                    if c.control_id in skipped:
                        continue
                    self._controls[c.control_id] = c
                    self._control_mrids[c.mrid] = c.control_id
                    self._audience.setdefault(audience_key(c), []).append(c.control_id)
                self._defaults.update((d.program_id, d) for d in st.defaults)
                self._der_docs.update(st.docs)
                for r in st.responses:
                    if r.control_id in skipped:
                        continue
                    self._responses[r.response_id] = r
                    self._response_keys[(r.control_id, r.edev_id, r.status)] = r.response_id
                for m in st.mups:
                    self._mups[m.mup_id] = m
                    self._mup_mrids[m.mrid] = m.mup_id
                for log in st.logs:
                    self._log_events.setdefault(log.edev_id, []).append(log)
                self._subscriptions.update((s.subscription_id, s) for s in st.subs)
                largest = {"edev": self._edevs, "fsa": self._fsas, "program": self._programs,
                           "control": self._controls, "response": self._responses,
                           "mup": self._mups, "curve": self._curves, "sub": self._subscriptions,
                           "log": {r.log_event_id: r for r in st.logs}}
                for kind in self._next:
                    self._next[kind] = max(self._next[kind], counters.get(f"next_{kind}", 1),
                                           max(largest.get(kind) or [0]) + 1)
                # a start is a change: no cached rendering of an earlier process matches
                self._version = counters.get("version", 0) + 1
                wanted = self._counters()
            new = [{"name": k, "value": v} for k, v in wanted.items() if k not in counters]
            if new:
                conn.execute(insert(CNT), new)
            store_counters(conn, counters, wanted)

    def forget_controls_ended_before(self, t: datetime) -> int:
        """Memory only (the rows stay stored); serialised with writes."""
        with self._writer:
            return super().forget_controls_ended_before(t)

    def _counters(self) -> dict[str, int]:
        return {"version": self._version, **{f"next_{k}": v for k, v in self._next.items()}}

    def _set_counters(self, values: dict[str, int]) -> None:
        self._version = values["version"]
        self._next.update({k: values[f"next_{k}"] for k in self._next})

    # --- the write path ---------------------------------------------------------------------------
    def _transact(self, change: Callable[[], tuple[T, Callable[[Connection], None]]]) -> T:
        """Run a write (see the module's docstring): ``change`` makes the change in memory
        (with the memory lock held), records in the journal what it touched and returns its
        result and the SQL that stores it; the SQL runs and commits without the memory lock,
        while readers see the state before the change; then memory gets the change."""
        with self._writer:
            if self._journal is not None:  # a write inside a write: one transaction
                result, persist = change()
                self._pending.append(persist)
                return result
            with self._engine.connect() as conn:
                # the database's write lock first: waiting for it holds no reader
                conn.execute(update(CNT).where(CNT.c.name == "version")
                             .values(value=CNT.c.value))
                with self._lock:
                    before = self._counters()
                    self._journal, self._pending = [], []
                    try:
                        result, persist = change()
                        persists = [*self._pending, persist]
                        after = self._counters()
                    finally:
                        entries = self._seal()
                        self._journal, self._pending = None, []
                        self._apply(entries, undo=True)  # readers see the committed state
                        self._set_counters(before)
                try:
                    for run in persists:
                        run(conn)
                    store_counters(conn, before, after)
                    conn.commit()
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.rollback()
                    raise
            with self._lock:  # committed: now memory
                self._apply(entries, undo=False)
                self._set_counters(after)
            return result

    def _keep(self, store: dict | set, key: Any = None, old: Any = _ABSENT,
              *, known: bool = True) -> None:
        """Journal ``store[key]`` (a set: the whole set) with its value before the change:
        the current one when ``known`` (call before changing it), else ``old``."""
        assert self._journal is not None
        if isinstance(store, set):
            self._journal.append([store, None, set(store)])
            return
        if known:
            old = store.get(key, _ABSENT)
        self._journal.append([store, key, list(old) if isinstance(old, list) else old])

    def _seal(self) -> list[tuple[Any, Any, Any, Any]]:
        """The journal's entries with their values after the change (copies of lists)."""
        out = []
        for store, key, old in self._journal or ():
            if isinstance(store, set):
                new: Any = set(store)
            else:
                new = store.get(key, _ABSENT)
                new = list(new) if isinstance(new, list) else new
            out.append((store, key, old, new))
        return out

    @staticmethod
    def _apply(entries: list[tuple[Any, Any, Any, Any]], *, undo: bool) -> None:
        for store, key, old, new in (reversed(entries) if undo else entries):
            value = old if undo else new
            if isinstance(store, set):
                store.clear()
                store.update(value)
            elif value is _ABSENT:
                store.pop(key, None)
            else:
                store[key] = list(value) if isinstance(value, list) else value

    def _new_aggregators(self, old: set[str]) -> list[dict[str, str]]:
        return [{"lfdi": a} for a in sorted(self._aggregators - old)]

    # --- end devices and aggregators --------------------------------------------------------------
    def add_end_device(self, lfdi: str, *, pin: int | None = None,
                       owner_lfdi: str | None = None, nmi: str | None = None,
                       fsa_ids: Sequence[int] = (), der_id: str | None = None,
                       meter_id: str | None = None) -> EndDeviceRecord:
        def change() -> tuple[EndDeviceRecord, Callable[[Connection], None]]:
            aggregators = set(self._aggregators)
            self._keep(self._aggregators)
            rec = InMemoryRepository.add_end_device(self, lfdi, pin=pin, owner_lfdi=owner_lfdi,
                                                    nmi=nmi, fsa_ids=fsa_ids, der_id=der_id,
                                                    meter_id=meter_id)
            self._keep(self._edevs, rec.edev_id, known=False)
            new_aggregators = self._new_aggregators(aggregators)

            def persist(conn: Connection) -> None:
                conn.execute(insert(EDEV), [to_row(rec, EDEV, fsa_ids=list(rec.fsa_ids))])
                if new_aggregators:
                    conn.execute(insert(AGG), new_aggregators)
            return rec, persist
        return self._transact(change)

    def add_end_devices(self, specs: Sequence[dict]) -> list[tuple[EndDeviceRecord, bool]]:
        """All in one transaction (each device is a nested write of this one); a bad spec
        leaves memory and the database unchanged."""
        def change() -> tuple[list[tuple[EndDeviceRecord, bool]],
                              Callable[[Connection], None]]:
            return InMemoryRepository.add_end_devices(self, specs), lambda conn: None
        return self._transact(change)

    def _undo_new_end_devices(self, done) -> None:  # the transaction's journal undoes them
        pass

    def touch_end_device(self, edev_id: int, changed_time: datetime) -> EndDeviceRecord:
        def change() -> tuple[EndDeviceRecord, Callable[[Connection], None]]:
            self._keep(self._edevs, edev_id)
            rec = InMemoryRepository.touch_end_device(self, edev_id, changed_time)
            return rec, lambda conn: conn.execute(
                update(EDEV).where(EDEV.c.edev_id == edev_id)
                .values(changed_time=rec.changed_time))
        return self._transact(change)

    def add_aggregator(self, lfdi: str) -> None:
        def change() -> tuple[None, Callable[[Connection], None]]:
            aggregators = set(self._aggregators)
            self._keep(self._aggregators)
            InMemoryRepository.add_aggregator(self, lfdi)
            rows = self._new_aggregators(aggregators)
            return None, lambda conn: conn.execute(insert(AGG), rows) if rows else None
        self._transact(change)

    def assign_fsa(self, edev_id: int, fsa_id: int) -> None:
        def change() -> tuple[None, Callable[[Connection], None]]:
            self._keep(self._edevs, edev_id)
            old = self._edevs.get(edev_id)
            InMemoryRepository.assign_fsa(self, edev_id, fsa_id)
            rec = self._edevs[edev_id]
            if old is not None and rec.fsa_ids == old.fsa_ids:
                return None, lambda conn: None
            return None, lambda conn: conn.execute(
                update(EDEV).where(EDEV.c.edev_id == edev_id)
                .values(fsa_ids=list(rec.fsa_ids)))
        self._transact(change)

    # --- function sets, programs, controls, curves ------------------------------------------------
    def add_fsa(self, description: str, program_ids: Sequence[int] = ()) -> FsaRecord:
        def change() -> tuple[FsaRecord, Callable[[Connection], None]]:
            rec = InMemoryRepository.add_fsa(self, description, program_ids)
            self._keep(self._fsas, rec.fsa_id, known=False)
            return rec, lambda conn: conn.execute(
                insert(FSA), [to_row(rec, FSA, program_ids=list(rec.program_ids))])
        return self._transact(change)

    def add_program(self, description: str, primacy: int) -> ProgramRecord:
        def change() -> tuple[ProgramRecord, Callable[[Connection], None]]:
            rec = InMemoryRepository.add_program(self, description, primacy)
            self._keep(self._programs, rec.program_id, known=False)
            return rec, lambda conn: conn.execute(insert(PROG), [to_row(rec, PROG)])
        return self._transact(change)

    def add_controls(self, specs: Sequence[ControlSpec]) -> list[tuple[ControlRecord, bool]]:
        def change() -> tuple[list[tuple[ControlRecord, bool]], Callable[[Connection], None]]:
            out = InMemoryRepository.add_controls(self, specs)
            created = [rec for rec, new in out if new]
            new_ids = {rec.control_id for rec in created}
            for rec in created:
                self._keep(self._controls, rec.control_id, known=False)
                self._keep(self._control_mrids, rec.mrid, known=False)
            for key in {audience_key(rec) for rec in created}:
                old = [i for i in self._audience.get(key, ()) if i not in new_ids]
                self._keep(self._audience, key, old or _ABSENT, known=False)
            rows = [limits_to_row(r, CTRL, extra=dict(r.extra) or None) for r in created]
            return out, lambda conn: conn.execute(insert(CTRL), rows) if rows else None
        return self._transact(change)

    def cancel_control(self, control_id: int) -> ControlRecord:
        def change() -> tuple[ControlRecord, Callable[[Connection], None]]:
            self._keep(self._controls, control_id)
            old = self._controls.get(control_id)
            rec = InMemoryRepository.cancel_control(self, control_id)
            if rec == old:
                return rec, lambda conn: None
            return rec, lambda conn: conn.execute(
                update(CTRL).where(CTRL.c.control_id == control_id)
                .values(cancelled_time=rec.cancelled_time, version=rec.version))
        return self._transact(change)

    def set_default_control(self, program_id: int, limits: DerLimits, *,
                            description: str = "", set_grad_w: int | None = None
                            ) -> DefaultControlRecord:
        def change() -> tuple[DefaultControlRecord, Callable[[Connection], None]]:
            self._keep(self._defaults, program_id)
            rec = InMemoryRepository.set_default_control(
                self, program_id, limits, description=description, set_grad_w=set_grad_w)

            def persist(conn: Connection) -> None:
                conn.execute(delete(DEF).where(DEF.c.program_id == program_id))
                conn.execute(insert(DEF), [limits_to_row(rec, DEF)])
            return rec, persist
        return self._transact(change)

    def add_curve(self, program_id: int, curve_type: int, x: Sequence[float],
                  y: Sequence[float], y_ref_type: int, *, description: str = "",
                  ramp_dec_tms: int | None = None, ramp_inc_tms: int | None = None,
                  ramp_pt1_tms: int | None = None) -> CurveRecord:
        def change() -> tuple[CurveRecord, Callable[[Connection], None]]:
            rec = InMemoryRepository.add_curve(
                self, program_id, curve_type, x, y, y_ref_type, description=description,
                ramp_dec_tms=ramp_dec_tms, ramp_inc_tms=ramp_inc_tms,
                ramp_pt1_tms=ramp_pt1_tms)
            self._keep(self._curves, rec.curve_id, known=False)
            return rec, lambda conn: conn.execute(
                insert(CURVE), [to_row(rec, CURVE, x=list(rec.x), y=list(rec.y))])
        return self._transact(change)

    # --- what clients PUT and POST ----------------------------------------------------------------
    def put_der_document(self, edev_id: int, kind: str, xml: bytes) -> bool:
        def change() -> tuple[bool, Callable[[Connection], None]]:
            self._keep(self._der_docs, (edev_id, kind))
            created = InMemoryRepository.put_der_document(self, edev_id, kind, xml)
            stored, received = self._der_docs[(edev_id, kind)]

            def persist(conn: Connection) -> None:
                conn.execute(delete(DOC).where(DOC.c.edev_id == edev_id, DOC.c.kind == kind))
                conn.execute(insert(DOC), [{"edev_id": edev_id, "kind": kind, "xml": stored,
                                             "received_time": received}])
            return created, persist
        return self._transact(change)

    def add_response(self, control_id: int, edev_id: int, status: int | None,
                     created_time: datetime | None) -> tuple[ResponseRecord, bool]:
        def change() -> tuple[tuple[ResponseRecord, bool], Callable[[Connection], None]]:
            rec, created = InMemoryRepository.add_response(self, control_id, edev_id, status,
                                                           created_time)
            if not created:
                return (rec, created), lambda conn: None
            self._keep(self._responses, rec.response_id, known=False)
            self._keep(self._response_keys, (control_id, edev_id, status), known=False)
            return (rec, created), lambda conn: conn.execute(insert(RESP), [to_row(rec, RESP)])
        return self._transact(change)

    def add_mirror_usage_point(self, rec: MirrorUsagePointRecord
                               ) -> tuple[MirrorUsagePointRecord, bool]:
        def change() -> tuple[tuple[MirrorUsagePointRecord, bool],
                              Callable[[Connection], None]]:
            old_id = self._mup_mrids.get(rec.mrid)
            old = self._mups.get(old_id) if old_id is not None else None
            stored, created = InMemoryRepository.add_mirror_usage_point(self, rec)
            self._keep(self._mups, stored.mup_id, old if old is not None else _ABSENT,
                       known=False)
            self._keep(self._mup_mrids, stored.mrid, old_id if old_id is not None else _ABSENT,
                       known=False)
            values = to_row(stored, MUP)
            readings = reading_rows(stored, len(old.readings) if old else 0)

            def persist(conn: Connection) -> None:
                if created:
                    conn.execute(insert(MUP), [values])
                else:
                    conn.execute(update(MUP).where(MUP.c.mup_id == stored.mup_id).values(
                        **{k: v for k, v in values.items() if k not in ("mup_id", "mrid")}))
                if readings:
                    conn.execute(insert(READ), readings)
            return (stored, created), persist
        return self._transact(change)

    def add_mirror_readings(self, mup_id: int, readings: Sequence[MirrorReadingRecord]
                            ) -> MirrorUsagePointRecord:
        def change() -> tuple[MirrorUsagePointRecord, Callable[[Connection], None]]:
            self._keep(self._mups, mup_id)
            old = self._mups.get(mup_id)
            mup = InMemoryRepository.add_mirror_readings(self, mup_id, readings)
            rows = reading_rows(mup, len(old.readings) if old else 0)
            return mup, lambda conn: conn.execute(insert(READ), rows) if rows else None
        return self._transact(change)

    def add_log_event(self, rec: LogEventRecord) -> LogEventRecord:
        def change() -> tuple[LogEventRecord, Callable[[Connection], None]]:
            old = list(self._log_events.get(rec.edev_id, ()))
            self._keep(self._log_events, rec.edev_id)
            saved = InMemoryRepository.add_log_event(self, rec)
            oldest = self._log_events[rec.edev_id][0].log_event_id
            dropped = bool(old) and old[0].log_event_id < oldest

            def persist(conn: Connection) -> None:
                conn.execute(insert(LOG), [to_row(saved, LOG)])
                if dropped:  # the device's oldest ones were let go
                    conn.execute(delete(LOG).where(LOG.c.edev_id == rec.edev_id,
                                                    LOG.c.log_event_id < oldest))
            return saved, persist
        return self._transact(change)

    def add_subscription(self, rec: SubscriptionRecord) -> tuple[SubscriptionRecord, bool]:
        def change() -> tuple[tuple[SubscriptionRecord, bool], Callable[[Connection], None]]:
            mine = {k: v for k, v in self._subscriptions.items() if v.edev_id == rec.edev_id}
            saved, created = InMemoryRepository.add_subscription(self, rec)
            sid = saved.subscription_id
            self._keep(self._subscriptions, sid, mine.get(sid, _ABSENT), known=False)
            values = to_row(saved, SUB, item_limit=saved.limit)
            if created:
                return (saved, created), lambda conn: conn.execute(insert(SUB), [values])
            return (saved, created), lambda conn: conn.execute(
                update(SUB).where(SUB.c.subscription_id == sid)
                .values(**{k: v for k, v in values.items() if k != "subscription_id"}))
        return self._transact(change)

    def delete_subscription(self, subscription_id: int) -> bool:
        def change() -> tuple[bool, Callable[[Connection], None]]:
            self._keep(self._subscriptions, subscription_id)
            deleted = InMemoryRepository.delete_subscription(self, subscription_id)
            if not deleted:
                return deleted, lambda conn: None
            return deleted, lambda conn: conn.execute(
                delete(SUB).where(SUB.c.subscription_id == subscription_id))
        return self._transact(change)
