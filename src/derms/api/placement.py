"""Registration check of where devices and meters sit: the bus (with node suffixes), phase
and service transformer a request gives must be in the feeder's model.

The model is the feeder's OpenDSS version in force now (the highest version whose
``valid_from`` has passed, as monitoring and the control loop pick it), else its latest
(a feeder whose only model starts later). Its elements are read from the version's
stored ``elements`` (:class:`~derms.grid.elements.ModelElements`, written when the version
was registered); a version stored without them (before migration 0009, or written
straight into the store) has them worked out once, by the model check's child process,
and stored. A feeder without a model version accepts any name (nothing to check against
yet; a later version's registration raises ``placement_unknown`` alarms for what it
lacks, :func:`derms.monitoring.placement.sync_placement_alarms`); so does one whose model
file cannot be read any more (logged).

The check runs in the registration's own transaction (:func:`placement_transaction`),
after taking the lock of the feeders it checks against (:func:`derms.store.locks.lock_feeders`;
registering a model version and raising the alarms of one coming into force take it too):
the version read is the one in force when the device or meter is stored, and a version
registered or coming into force afterwards sees it and alarms on what it cannot place.
(The check used to read the version in a session of its own before the insert's
transaction: a version registered in between was missed by both.) Elements still to be
worked out are worked out outside the transaction, with no lock held, and the
registration runs again.

What the check reads before the lock, the rows' sites (their feeders are what it locks)
and a batch's ids already registered, is what the insert uses: sites and ids are never
changed or removed, so a read can only miss one another request stores meanwhile, and
then the insert breaks its key and the registration runs again
(:func:`placement_transaction`), reading it.

Answers are RFC 9457 problems (422) whose ``errors`` name the field, the value and, for
batches, the row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from derms.api.conflicts import ATTEMPTS, is_unique_violation
from derms.api.model_check import inspect_model_sync
from derms.api.problems import Problem
from derms.errors import DermsError
from derms.grid.bundled import resolve_master
from derms.grid.elements import ModelElements
from derms.store.locks import lock_feeders
from derms.store.model_versions import VersionRow, stored_elements, version_in_force
from derms.store.models import DerSite, FeederModelVersion

log = logging.getLogger(__name__)

RETRY_S = 600.0  # a version whose elements could not be worked out: tried again after this
T = TypeVar("T")


@dataclass(frozen=True)
class FeederModel:
    """The elements of a feeder's model version."""

    feeder_id: str
    version: int
    elements: ModelElements


class ElementsCache:
    """The elements of model versions by row id, for one app (``app.state``): a version's
    elements never change once stored, so each is read from the store and built once (IEEE
    8500: 4,876 buses, 114 kB of JSON); a version whose elements could not be worked out
    (file gone, model no longer compiles) is not compiled again for ``RETRY_S``."""

    def __init__(self, retry_s: float = RETRY_S) -> None:
        self.retry_s = retry_s
        self._known: dict[int, ModelElements] = {}
        self._failed: dict[int, float] = {}
        self._lock = threading.Lock()

    def get(self, vid: int) -> ModelElements | None:
        return self._known.get(vid)

    def failed_recently(self, vid: int) -> bool:
        t = self._failed.get(vid)
        return t is not None and time.monotonic() - t < self.retry_s

    def put(self, vid: int, elements: ModelElements | None) -> None:
        with self._lock:
            if elements is None:
                self._failed[vid] = time.monotonic()
            else:
                self._known[vid] = elements
                self._failed.pop(vid, None)


class ElementsNeeded(Exception):
    """Model versions whose elements are neither cached nor stored: they are worked out
    (a child process compiles each model) outside the registration's transaction, which
    :func:`placement_transaction` then runs again."""

    def __init__(self, versions: Sequence[VersionRow]) -> None:
        super().__init__(", ".join(f"{v.feeder_id} v{v.version}" for v in versions))
        self.versions = tuple(versions)


def feeder_models(s: Session, feeder_ids: Iterable[str | None], cache: ElementsCache
                  ) -> dict[str, FeederModel]:
    """The model of each feeder that has one (module docstring), read in ``s``.

    Raises :class:`ElementsNeeded` (every such version at once) when a version's elements
    are neither in ``cache`` nor stored and were not found unworkable in the last
    ``cache.retry_s``; a version whose elements are unworkable checks nothing."""
    out: dict[str, FeederModel] = {}
    needed: list[VersionRow] = []
    for fid in sorted({f for f in feeder_ids if f is not None}):
        v = version_in_force(s, fid)
        if v is None:
            continue
        elements = cache.get(v.vid)
        if elements is None:  # (JSON null or SQL NULL: not stored)
            data = stored_elements(s, v.vid)
            if data is not None:
                elements = ModelElements.from_json(data)
                cache.put(v.vid, elements)
        if elements is not None:
            out[fid] = FeederModel(fid, v.version, elements)
        elif not cache.failed_recently(v.vid):
            needed.append(v)
    if needed:
        raise ElementsNeeded(needed)
    return out


def _backfill(sessions: sessionmaker, v: VersionRow) -> dict[str, Any] | None:
    """Work out ``v``'s elements (a child process compiles its model) and store them;
    None when the file is gone or the model is no longer usable (logged)."""
    fid, version, uri = v.feeder_id, v.version, v.source_uri
    try:
        master = resolve_master((uri or "").removeprefix("file://"))
    except DermsError:  # the file is gone: nothing to check against (module docstring)
        master = None
    if not uri or master is None or not master.is_file():
        log.warning("placement_check_skipped feeder=%s version=%s reason=model_file_missing "
                    "source_uri=%s", fid, version, uri)
        return None
    check = inspect_model_sync(str(master.resolve()))
    if check.elements is None:
        log.warning("placement_check_skipped feeder=%s version=%s reason=%s", fid, version,
                    check.problem or "no elements")
        return None
    data = check.elements.to_json()
    with sessions.begin() as s:
        row = s.get(FeederModelVersion, v.vid)
        if row is not None and row.elements is None:
            row.elements = data
    return data


def placement_transaction(sessions: sessionmaker, write: Callable[[Session], T],
                          cache: ElementsCache) -> T:
    """``write(session)`` in one transaction, committed when it returns; ``write`` calls
    :func:`check_placement` on that session before it stores anything. When the check
    meets versions whose elements must be worked out, the transaction is rolled back,
    they are worked out (no lock held: compiling takes seconds) and ``write`` runs again in
    a new one. When the insert breaks a unique key (an id or site another request stored
    after ``write`` read that it was not there), the transaction is rolled back and
    ``write`` runs again, reading what the other stored: it answers as it would have after
    it (409 for an id, a batch's ``existing``), never the database's error. 503 when either
    keeps happening (``ATTEMPTS``)."""
    why = ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with sessions.begin() as s:
                return write(s)
        except ElementsNeeded as exc:
            why = "the feeders' model versions changed while the registration was checked"
            for v in exc.versions:
                data = _backfill(sessions, v)
                cache.put(v.vid, None if data is None else ModelElements.from_json(data))
        except IntegrityError as exc:
            if not is_unique_violation(exc):  # another integrity rule: not a race
                raise
            why = "other registrations stored the same ids or sites meanwhile"
            log.warning("registration_conflict attempt=%d error=%s", attempt,
                        str(exc.orig).splitlines()[0] if exc.orig else exc)
    raise Problem(503, f"{why}; nothing was stored, send it again",
                  headers={"Retry-After": "1"})


def _sites(s: Session, site_ids: Iterable[str]) -> dict[str, DerSite]:
    """The registered sites among ``site_ids``."""
    ids = sorted(set(site_ids))
    if not ids:
        return {}
    return {x.site_id: x for x in s.scalars(select(DerSite).where(DerSite.site_id.in_(ids)))}


def placement_errors(model: FeederModel, row: Any, site_bus: str | None = None
                     ) -> list[dict[str, str]]:
    """Every problem of one row (``bus``, ``phase``, ``service_transformer`` attributes)
    against ``model``: ``{"field", "value", "detail"}`` each. ``site_bus``: the bus of the
    row's site, where a device without a bus of its own sits (as the control loop reads
    it)."""
    el, errors = model.elements, []
    where = f" (feeder {model.feeder_id!r}, model version {model.version})"
    bus = getattr(row, "bus", None) or site_bus
    if bus:
        problem = el.bus_problem(bus)
        if problem is not None:
            errors.append({"field": "bus", "value": bus, "detail": problem + where})
        else:
            phase = getattr(row, "phase", None)
            phase = None if phase is None else str(getattr(phase, "value", phase))
            problem = el.phase_problem(bus, phase) if phase else None
            if problem is not None:
                errors.append({"field": "phase", "value": phase, "detail": problem + where})
    xfm = getattr(row, "service_transformer", None)
    if xfm:
        problem = el.transformer_problem(xfm)
        if problem is not None:
            errors.append({"field": "service_transformer", "value": xfm,
                           "detail": problem + where})
    return errors


def check_placement(s: Session, rows: Sequence[Any], what: str, *, batch: bool,
                    cache: ElementsCache, skip: Collection[int] = ()) -> dict[str, DerSite]:
    """422 problem+json when a row's bus, phase or service transformer is not in its
    feeder's model (every such row listed; ``row`` is its index in a batch; rows at the
    positions in ``skip`` are not checked). A row's feeder is its ``feeder_id``, else its
    site's (devices: the registered site, or the one an earlier row of the batch creates);
    a device without a bus of its own is checked at its site's bus.

    Runs in the registration's write transaction ``s`` (:func:`placement_transaction`):
    takes the lock of the feeders it checks against, then reads their versions in force
    (module docstring); raises :class:`ElementsNeeded` for versions whose elements are not
    stored yet. Returns the rows' registered sites as it read them: the insert takes them
    from here and stores the others, never reads them again. (It did: a device naming no
    feeder whose new site another request stored meanwhile, on a feeder with a model, was
    stored on that feeder unchecked. Now its site's insert breaks the key and the
    registration runs again, checked on that feeder.)"""
    sites = _sites(s, [r.site_id for r in rows if hasattr(r, "site_id")])
    known: dict[str, tuple[str | None, str | None]] = {
        k: (x.feeder_id, x.bus) for k, x in sites.items()}  # (feeder, bus) by site
    feeder, site_bus = [], []
    for r in rows:
        sid = getattr(r, "site_id", None)
        at = known.get(sid) if sid is not None else None
        if sid is not None and at is None:  # created by this row: later rows use it
            at = known[sid] = (r.feeder_id, r.bus)
        feeder.append(getattr(r, "feeder_id", None) or (at[0] if at else None))
        site_bus.append(at[1] if at else None)
    feeder = [None if k in skip else f for k, f in enumerate(feeder)]
    lock_feeders(s, feeder)
    models = feeder_models(s, feeder, cache)
    if not models:
        return sites
    errors: list[dict[str, Any]] = []
    for k, (r, fid) in enumerate(zip(rows, feeder, strict=True)):
        if fid in models:
            for e in placement_errors(models[fid], r, site_bus[k]):
                errors.append({"row": k, **e} if batch else
                              {**e, "field": f"body.{e['field']}"})
    if not errors:
        return sites
    if batch:
        n = len({e["row"] for e in errors})
        detail = (f"{what}: {n} row(s) name a bus, phase or transformer their feeder's model "
                  f"does not have (first: row {errors[0]['row']}, {errors[0]['detail']}); "
                  "nothing was stored")
    else:
        detail = f"{what}: {errors[0]['detail']}"
    raise Problem(422, detail, type_="unknown-model-element", errors=errors)


__all__ = ["ElementsCache", "ElementsNeeded", "FeederModel", "check_placement",
           "feeder_models", "placement_errors", "placement_transaction"]
