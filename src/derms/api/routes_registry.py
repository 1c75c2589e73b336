"""Registry: feeders and DER devices (list with pagination, get, create). Writes are audited.

Where a device or meter sits is checked against its feeder's model when the feeder has
one (:mod:`derms.api.placement`): a bus (``"671"``, or with node suffixes ``"671.1.2"``),
phase or service transformer the model does not have is 422 problem+json naming the
field, the value and, in a batch, the row; nothing is stored. A feeder without a model
version accepts any name. The check and the insert are one transaction, under the lock of
the feeders checked against (:func:`derms.api.placement.placement_transaction`). Bus and
transformer names are stored stripped and lower case, as OpenDSS reports them.

A repeated registration: ``POST /feeders``, ``/devices`` or ``/meters`` with an id already
registered is 409 problem+json naming it (whatever its fields); a batch lists such ids in
``existing`` and leaves them as they are. Two requests registering the same new id at once
answer the same way: the one whose insert meets the other's row runs again and answers
as if it came second (it had got the database's uniqueness error as a 500;
:mod:`derms.api.conflicts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from derms.api.auth import Principal, require
from derms.api.conflicts import unique_transaction
from derms.api.fields import ElementName, Id, Text64, Text200, Text500
from derms.api.json_body import StrictJsonRoute
from derms.api.paging import Limit, Offset
from derms.api.placement import ElementsCache, check_placement, placement_transaction
from derms.api.problems import Problem
from derms.store.audit import append_audit
from derms.store.models import (
    DerDevice,
    DerSite,
    DerType,
    DeviceStatus,
    Feeder,
    Meter,
    Phase,
    Protocol,
)
from derms.strict import StrictScalars

router = APIRouter(tags=["registry"], route_class=StrictJsonRoute)
_Row = TypeVar("_Row")


class FeederIn(StrictScalars):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    feeder_id: Id
    name: Text200 = ""
    substation: Text64 | None = None


class DeviceIn(StrictScalars):
    """A DER device. Powers: ``p_gen_max_kw`` (output) and ``p_charge_max_kw`` (charging)
    are >= 0; ``q_max_kvar`` >= 0 >= ``q_min_kvar``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    der_id: Id
    site_id: Id
    feeder_id: Id | None = None
    der_type: DerType
    s_max_kva: float = Field(gt=0)
    p_gen_max_kw: float = Field(default=0.0, ge=0)
    p_charge_max_kw: float = Field(default=0.0, ge=0)
    e_max_kwh: float | None = Field(default=None, ge=0)
    q_max_kvar: float = Field(default=0.0, ge=0)
    q_min_kvar: float = Field(default=0.0, le=0)
    phase: Phase = Phase.ABC
    bus: ElementName | None = None
    service_transformer: ElementName | None = None
    owner: Text200 | None = None
    aggregator: Text200 | None = None
    protocol: Protocol = Protocol.NONE
    endpoint: Text500 | None = None
    status: DeviceStatus = DeviceStatus.COMMISSIONING

    @model_validator(mode="after")
    def _within_apparent_power(self) -> DeviceIn:
        """Every P and Q limit within the nameplate kVA (a 500 kW generator on a 5 kVA
        inverter was accepted)."""
        for name in ("p_gen_max_kw", "p_charge_max_kw", "q_max_kvar", "q_min_kvar"):
            value = abs(getattr(self, name))
            if value > self.s_max_kva * (1 + 1e-9):
                raise ValueError(f"{name} {getattr(self, name):g} is beyond s_max_kva "
                                 f"{self.s_max_kva:g}")
        return self


class MeterIn(StrictScalars):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    meter_id: Id
    feeder_id: Id | None = None
    bus: ElementName | None = None
    service_transformer: ElementName | None = None
    phase: Phase | None = None


def _page(request: Request, model, order, limit: int, offset: int) -> dict:
    """One page of ``model`` rows in ``order``, as plain dicts, with the total count."""
    with request.app.state.sessions() as session:
        total = session.scalar(select(func.count()).select_from(model))
        rows = session.scalars(select(model).order_by(order).limit(limit).offset(offset))
        items = [_columns(r) for r in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


def _columns(obj) -> dict:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


@router.get("/feeders")
def list_feeders(request: Request, _p: Annotated[Principal, Depends(require("read"))],
                 limit: Limit = 100, offset: Offset = 0) -> dict:
    return _page(request, Feeder, Feeder.feeder_id, limit, offset)


@router.post("/feeders", status_code=201)
def create_feeder(request: Request, body: FeederIn,
                  principal: Annotated[Principal, Depends(require("admin"))]) -> dict:
    """Register a feeder; 409 problem+json when its id is registered (module docstring)."""

    def write(s: Session) -> dict:
        if s.get(Feeder, body.feeder_id) is not None:
            raise Problem(409, f"feeder {body.feeder_id!r} exists")
        s.add(Feeder(**body.model_dump()))
        s.flush()
        append_audit(s, actor=principal.token_id, action="create", entity="feeder",
                     entity_id=body.feeder_id, detail=body.model_dump())
        return body.model_dump()

    return unique_transaction(request.app.state.sessions, write,
                              f"feeder {body.feeder_id!r}")


@router.get("/devices")
def list_devices(request: Request, _p: Annotated[Principal, Depends(require("read"))],
                 limit: Limit = 100, offset: Offset = 0) -> dict:
    return _page(request, DerDevice, DerDevice.der_id, limit, offset)


@router.get("/devices/{der_id}")
def get_device(request: Request, der_id: str,
               _p: Annotated[Principal, Depends(require("read"))]) -> dict:
    with request.app.state.sessions() as s:
        dev = s.get(DerDevice, der_id)
        if dev is None:
            raise Problem(404, f"unknown device {der_id!r}")
        return _columns(dev)


@router.post("/devices", status_code=201)
def create_device(request: Request, body: DeviceIn,
                  principal: Annotated[Principal, Depends(require("admin"))]) -> dict:
    """Register a device; its site is created on first use. Its bus, phase and service
    transformer must be in its feeder's model when the feeder has one (module docstring)."""
    cache = _elements_cache(request)

    def write(s: Session) -> dict:
        sites = check_placement(s, [body], f"device {body.der_id!r}", batch=False,
                                cache=cache)
        data = body.model_dump()
        feeder_id = data.pop("feeder_id")
        if s.get(DerDevice, body.der_id) is not None:
            raise Problem(409, f"device {body.der_id!r} exists")
        if feeder_id is not None and s.get(Feeder, feeder_id) is None:
            raise Problem(422, f"unknown feeder {feeder_id!r}")
        site = sites.get(body.site_id)  # as checked (placement.check_placement)
        if site is None:
            s.add(DerSite(site_id=body.site_id, feeder_id=feeder_id, bus=body.bus,
                          service_transformer=body.service_transformer, owner=body.owner))
            s.flush()
        else:
            _same_feeder(site, feeder_id, body.der_id)
            feeder_id = site.feeder_id
        s.add(DerDevice(**data))
        out = {**body.model_dump(mode="json"), "feeder_id": feeder_id}
        append_audit(s, actor=principal.token_id, action="create", entity="der_device",
                     entity_id=body.der_id, detail=out)
        return out

    return placement_transaction(request.app.state.sessions, write, cache)


def _same_feeder(site: DerSite, feeder_id: str | None, der_id: str) -> None:
    """409 when a device names another feeder than its (existing) site is on."""
    if feeder_id is not None and feeder_id != site.feeder_id:
        on = "no feeder" if site.feeder_id is None else f"feeder {site.feeder_id!r}"
        raise Problem(409, f"device {der_id!r}: site {site.site_id!r} is on {on}, not "
                           f"{feeder_id!r}")


class DevicesIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    devices: list[DeviceIn] = Field(min_length=1, max_length=10_000)


class MetersIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    meters: list[MeterIn] = Field(min_length=1, max_length=10_000)


def _unique_ids(rows, field: str, what: str) -> list[str]:
    """The rows' ids; 422 when one is given twice."""
    ids = [getattr(r, field) for r in rows]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise Problem(422, f"{what}: {field} {dup!r} given twice")
    return ids


def _elements_cache(request: Request) -> ElementsCache:
    """The app's cache of model versions' elements (``create_app`` makes it)."""
    state = request.app.state
    if getattr(state, "model_elements", None) is None:
        state.model_elements = ElementsCache()
    return state.model_elements


def _registered(s: Session, column, ids: list[str]) -> tuple[set[str], set[int]]:
    """The ids already registered and their positions: a batch leaves those as they are
    (not stored again, their placement not checked again). One query per request."""
    have = set(s.scalars(select(column).where(column.in_(ids))))
    return have, {k for k, i in enumerate(ids) if i in have}


def _in_key_order(objs: Iterable[_Row], key: str) -> list[_Row]:
    """``objs`` sorted by their ``key`` attribute. A batch inserts its new rows in key order,
    not the request's: two batches sharing new ids in different orders each held one the
    other was about to insert, and PostgreSQL ended one with a deadlock error (500); in
    key order the later one waits, then runs again as a repeat (placement_transaction)."""
    return sorted(objs, key=attrgetter(key))


def _check_feeders(s, rows, what: str) -> None:
    """422 when a row names a feeder the registry does not have."""
    wanted = {r.feeder_id for r in rows} - {None}
    unknown = wanted - set(s.scalars(select(Feeder.feeder_id).where(
        Feeder.feeder_id.in_(wanted)))) if wanted else set()
    if unknown:
        raise Problem(422, f"{what}: unknown feeder(s) {sorted(unknown)}")


@router.post("/devices/batch", status_code=201)
def create_devices(request: Request, body: DevicesIn,
                   principal: Annotated[Principal, Depends(require("admin"))]) -> dict:
    """Register up to 10,000 devices in one transaction, all or nothing; sites are created
    on first use. Devices already registered are listed in ``existing`` and left as they
    are; an unknown feeder, a ``der_id`` given twice or a bus, phase or transformer the
    feeder's model does not have (every such row listed) is 422 and nothing is stored."""
    rows = body.devices
    ids = _unique_ids(rows, "der_id", "devices")
    cache = _elements_cache(request)

    def write(s: Session) -> dict:
        existing, at = _registered(s, DerDevice.der_id, ids)
        sites = check_placement(s, rows, "devices", batch=True, cache=cache, skip=at)
        _check_feeders(s, rows, "devices")
        created, new_sites, devices = [], [], []
        for r in rows:
            if r.der_id in existing:
                continue
            data = r.model_dump()
            feeder_id = data.pop("feeder_id")
            if r.site_id not in sites:
                site = DerSite(site_id=r.site_id, feeder_id=feeder_id, bus=r.bus,
                               service_transformer=r.service_transformer, owner=r.owner)
                new_sites.append(site)
                sites[r.site_id] = site
            else:
                _same_feeder(sites[r.site_id], feeder_id, r.der_id)
            devices.append(DerDevice(**data))
            created.append(r.der_id)
        s.add_all(_in_key_order(new_sites, "site_id"))  # (inserted before the devices)
        s.add_all(_in_key_order(devices, "der_id"))
        s.flush()
        append_audit(s, actor=principal.token_id, action="create", entity="der_device",
                     entity_id=f"batch of {len(created)}", detail={"der_ids": created})
        return {"created": created, "existing": sorted(existing)}

    return placement_transaction(request.app.state.sessions, write, cache)


@router.post("/meters/batch", status_code=201)
def create_meters(request: Request, body: MetersIn,
                  principal: Annotated[Principal, Depends(require("admin"))]) -> dict:
    """Register up to 10,000 meters in one transaction (as ``/devices/batch``)."""
    rows = body.meters
    ids = _unique_ids(rows, "meter_id", "meters")
    cache = _elements_cache(request)

    def write(s: Session) -> dict:
        existing, at = _registered(s, Meter.meter_id, ids)
        check_placement(s, rows, "meters", batch=True, cache=cache, skip=at)
        _check_feeders(s, rows, "meters")
        created = [r.meter_id for r in rows if r.meter_id not in existing]
        s.add_all(Meter(**r.model_dump()) for r in _in_key_order(rows, "meter_id")
                  if r.meter_id not in existing)
        s.flush()
        append_audit(s, actor=principal.token_id, action="create", entity="meter",
                     entity_id=f"batch of {len(created)}", detail={"meter_ids": created})
        return {"created": created, "existing": sorted(existing)}

    return placement_transaction(request.app.state.sessions, write, cache)


@router.post("/meters", status_code=201)
def create_meter(request: Request, body: MeterIn,
                 principal: Annotated[Principal, Depends(require("admin"))]) -> dict:
    """Register a meter; its bus, phase and service transformer must be in its feeder's
    model when the feeder has one (module docstring)."""
    cache = _elements_cache(request)

    def write(s: Session) -> dict:
        check_placement(s, [body], f"meter {body.meter_id!r}", batch=False, cache=cache)
        if s.get(Meter, body.meter_id) is not None:
            raise Problem(409, f"meter {body.meter_id!r} exists")
        if body.feeder_id is not None and s.get(Feeder, body.feeder_id) is None:
            raise Problem(422, f"unknown feeder {body.feeder_id!r}")
        s.add(Meter(**body.model_dump()))
        append_audit(s, actor=principal.token_id, action="create", entity="meter",
                     entity_id=body.meter_id, detail=body.model_dump(mode="json"))
        return body.model_dump(mode="json")

    return placement_transaction(request.app.state.sessions, write, cache)
