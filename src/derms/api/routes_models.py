"""Feeder network models: register an OpenDSS model version, list a feeder's versions.

A feeder is monitored (``derms serve --monitor-period-s``) once it has an OpenDSS model
version whose ``valid_from`` has passed; registering one here tells a running monitoring
cycle to pick it up at once (a new feeder, or a new version of a monitored one). The
version keeps the model's buses and transformers; devices and meters already registered
on the feeder at a bus, phase or transformer the version lacks get a
``placement_unknown:<id>`` alarm each (:mod:`derms.monitoring.placement`; counts in the
answer's ``placement_alarms``), and such alarms the new version resolves are cleared.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from derms.api.auth import Principal, require
from derms.api.fields import Text500
from derms.api.json_body import StrictJsonRoute
from derms.api.model_check import inspect_model
from derms.api.problems import Problem
from derms.grid.bundled import resolve_master
from derms.grid.elements import ModelElements
from derms.monitoring.placement import sync_placement_alarms
from derms.store.audit import append_audit
from derms.store.locks import lock_feeders
from derms.store.models import Feeder, FeederModelVersion
from derms.store.types import ensure_utc, utcnow
from derms.strict import StrictScalars

router = APIRouter(tags=["registry"], route_class=StrictJsonRoute)


class ModelIn(StrictScalars):
    """``source_uri``: the OpenDSS master file on the server (absolute path, ``file://``
    allowed) or a bundled feeder's name ("ieee13"); ``valid_from`` (aware, default now)."""

    model_config = ConfigDict(extra="forbid")
    source_uri: Text500
    valid_from: datetime | None = None


def _out(v: FeederModelVersion) -> dict[str, Any]:
    return {"feeder_id": v.feeder_id, "version": v.version, "source_format": v.source_format,
            "source_uri": v.source_uri, "sha256": v.sha256,
            "valid_from": _stored_utc(v.valid_from).isoformat()}


def _stored_utc(t: datetime) -> datetime:
    """A stored time as aware UTC (SQLite gives ``DateTime(timezone=True)`` back naive)."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@router.post("/feeders/{feeder_id}/models", status_code=201)
async def add_model_version(request: Request, feeder_id: str, body: ModelIn,
                            principal: Annotated[Principal, Depends(require("admin"))]
                            ) -> dict[str, Any]:
    """Register the next model version of a feeder (404 for an unknown feeder, 422 for a
    master file that does not exist, does not compile, crashes the engine or whose base
    case does not solve, checked in a child process (:mod:`derms.api.model_check`);
    before, such a version was registered and the monitor only logged the error); the
    file's SHA-256 and the model's buses and transformers (what device and meter
    registrations are checked against, :mod:`derms.api.placement`) are kept with it."""
    if body.valid_from is not None and body.valid_from.tzinfo is None:
        raise Problem(422, "valid_from has no time zone")
    master = resolve_master(body.source_uri.removeprefix("file://"))
    if not master.is_file():
        raise Problem(422, f"source_uri {body.source_uri!r}: not a file")
    try:
        digest = hashlib.sha256(master.read_bytes()).hexdigest()
    except OSError as exc:
        raise Problem(422, f"source_uri {body.source_uri!r}: cannot read it "
                           f"({exc.strerror or exc})") from None
    await run_in_threadpool(_feeder_exists, request, feeder_id)  # 404 before compiling
    check = await inspect_model(str(master))
    problem = check.problem
    if problem is not None:
        detail = f"source_uri {body.source_uri!r}: not a usable OpenDSS model: {problem}"
        raise Problem(422, detail, errors=[{"field": "body.source_uri", "detail": detail}])
    try:
        out = await run_in_threadpool(_register, request, feeder_id, body, digest, principal,
                                      None if check.elements is None
                                      else check.elements.to_json())
    except IntegrityError:  # another registration took this version number meanwhile
        raise Problem(409, f"feeder {feeder_id!r}: another model version was registered "
                           "at the same time; send the request again") from None
    monitor = getattr(request.app.state, "monitor", None)
    if monitor is not None and hasattr(monitor, "notify_models_changed"):
        monitor.notify_models_changed()
    return out


def _feeder_exists(request: Request, feeder_id: str) -> None:
    with request.app.state.sessions() as s:
        if s.get(Feeder, feeder_id) is None:
            raise Problem(404, f"unknown feeder {feeder_id!r}")


def _register(request: Request, feeder_id: str, body: ModelIn, digest: str,
              principal: Principal, elements: dict[str, Any] | None) -> dict[str, Any]:
    with request.app.state.sessions.begin() as s:
        # registrations on the feeder wait (derms.api.placement): the alarms below see
        # every device and meter checked against the version before this one
        lock_feeders(s, [feeder_id])
        if s.get(Feeder, feeder_id) is None:
            raise Problem(404, f"unknown feeder {feeder_id!r}")
        last = s.scalar(select(func.max(FeederModelVersion.version)).where(
            FeederModelVersion.feeder_id == feeder_id)) or 0
        v = FeederModelVersion(feeder_id=feeder_id, version=last + 1, source_format="opendss",
                               source_uri=body.source_uri, sha256=digest,
                               valid_from=ensure_utc(body.valid_from or utcnow(),
                                                     "valid_from"),
                               elements=elements)
        s.add(v)
        s.flush()
        out = _out(v)
        append_audit(s, actor=principal.token_id, action="create", entity="feeder_model",
                     entity_id=f"{feeder_id} v{v.version}", detail=out)
        now = utcnow()
        if elements is not None and v.valid_from <= now:
            # devices and meters this version cannot place: alarms (a version that is not
            # in force yet is checked when the monitor takes it up, see monitoring.cycle)
            sync = sync_placement_alarms(s, feeder_id, ModelElements.from_json(elements),
                                         v.version, now)
            out["placement_alarms"] = {"raised": len(sync.raised),
                                       "cleared": len(sync.cleared), "open": sync.open}
        elif elements is not None:
            out["placement_alarms"] = {"deferred_until": v.valid_from.isoformat()}
    return out


@router.get("/feeders/{feeder_id}/models")
def list_model_versions(request: Request, feeder_id: str,
                        _p: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    with request.app.state.sessions() as s:
        if s.get(Feeder, feeder_id) is None:
            raise Problem(404, f"unknown feeder {feeder_id!r}")
        rows = s.scalars(select(FeederModelVersion).where(
            FeederModelVersion.feeder_id == feeder_id).order_by(FeederModelVersion.version))
        return {"feeder_id": feeder_id, "items": [_out(v) for v in rows]}
