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

Answers are RFC 9457 problems (422) whose ``errors`` name the field, the value and, for
batches, the row.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from derms.api.model_check import inspect_model_sync
from derms.api.problems import Problem
from derms.grid.bundled import resolve_master
from derms.grid.elements import ModelElements
from derms.store.models import DerSite, FeederModelVersion
from derms.store.types import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeederModel:
    """The elements of a feeder's model version."""

    feeder_id: str
    version: int
    elements: ModelElements


def _version_row(s: Session, feeder_id: str) -> FeederModelVersion | None:
    base = select(FeederModelVersion).where(FeederModelVersion.feeder_id == feeder_id,
                                            FeederModelVersion.source_format == "opendss")
    now = utcnow()
    row = s.scalars(base.where(FeederModelVersion.valid_from <= now)
                    .order_by(FeederModelVersion.version.desc()).limit(1)).first()
    if row is None:
        row = s.scalars(base.order_by(FeederModelVersion.version.desc()).limit(1)).first()
    return row


def feeder_models(sessions: sessionmaker, feeder_ids: Iterable[str | None]
                  ) -> dict[str, FeederModel]:
    """The model of each feeder that has one (see the module docstring); a version without
    stored elements gets them now (a child process compiles it) and keeps them."""
    out: dict[str, FeederModel] = {}
    for fid in sorted({f for f in feeder_ids if f is not None}):
        with sessions() as s:
            row = _version_row(s, fid)
            if row is None:
                continue
            vid, version, uri, data = row.id, row.version, row.source_uri, row.elements
        if data is None:
            data = _backfill(sessions, vid, fid, version, uri)
            if data is None:
                continue
        out[fid] = FeederModel(fid, version, ModelElements.from_json(data))
    return out


def _backfill(sessions: sessionmaker, vid: int, fid: str, version: int, uri: str
              ) -> dict[str, Any] | None:
    master = resolve_master((uri or "").removeprefix("file://"))
    if not uri or not master.is_file():
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
        row = s.get(FeederModelVersion, vid)
        if row is not None and row.elements is None:
            row.elements = data
    return data


def site_feeders(sessions: sessionmaker, site_ids: Iterable[str]) -> dict[str, str | None]:
    """The feeder of each registered site (a device on an existing site is on its feeder)."""
    ids = sorted(set(site_ids))
    if not ids:
        return {}
    with sessions() as s:
        return dict(s.execute(select(DerSite.site_id, DerSite.feeder_id)
                              .where(DerSite.site_id.in_(ids))).all())


def placement_errors(model: FeederModel, row: Any) -> list[dict[str, str]]:
    """Every problem of one row (``bus``, ``phase``, ``service_transformer`` attributes)
    against ``model``: ``{"field", "value", "detail"}`` each."""
    el, errors = model.elements, []
    where = f" (feeder {model.feeder_id!r}, model version {model.version})"
    bus = getattr(row, "bus", None)
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


def check_placement(sessions: sessionmaker, rows: Sequence[Any], what: str, *,
                    batch: bool, skip: Collection[int] = ()) -> None:
    """422 problem+json when a row's bus, phase or service transformer is not in its
    feeder's model (every such row listed; ``row`` is its index in a batch; rows at the
    positions in ``skip`` are not checked). A row's feeder is its ``feeder_id``, else its
    existing site's (devices)."""
    sites = site_feeders(sessions, [r.site_id for r in rows if hasattr(r, "site_id")])
    feeder = [None if k in skip else
              getattr(r, "feeder_id", None) or sites.get(getattr(r, "site_id", None))
              for k, r in enumerate(rows)]
    models = feeder_models(sessions, feeder)
    if not models:
        return
    errors: list[dict[str, Any]] = []
    for k, (r, fid) in enumerate(zip(rows, feeder, strict=True)):
        if fid in models:
            for e in placement_errors(models[fid], r):
                errors.append({"row": k, **e} if batch else
                              {**e, "field": f"body.{e['field']}"})
    if not errors:
        return
    if batch:
        n = len({e["row"] for e in errors})
        detail = (f"{what}: {n} row(s) name a bus, phase or transformer their feeder's model "
                  f"does not have (first: row {errors[0]['row']}, {errors[0]['detail']}); "
                  "nothing was stored")
    else:
        detail = f"{what}: {errors[0]['detail']}"
    raise Problem(422, detail, type_="unknown-model-element", errors=errors)


__all__ = ["FeederModel", "check_placement", "feeder_models", "placement_errors"]
