"""IEEE 2030.5 management: the operator's side of the resources the 2030.5 listener serves.

Every route works on the repository on ``app.state.ieee2030_5_repo`` — the same instance the
listener of ``derms serve --ieee2030-5-port`` reads — so a control published here is what a
device polling its DERControlList sees next. Without the listener the routes answer 503.

Scopes: configuration (end devices, aggregators, programs, function set assignments,
default controls) needs ``admin``; controls and operating envelopes need ``operate``;
listings need ``read``. Writes are audited. Powers are W, >= 0, named by direction at the
site's connection point: ``export_limit_w`` → CSIP-AUS opModExpLimW, ``import_limit_w`` →
opModImpLimW, ``generation_limit_w`` → opModGenLimW, ``load_limit_w`` → opModLoadLimW.

Operating envelopes: :mod:`derms.api.routes_ieee2030_5_envelopes`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from lxml import etree
from pydantic import ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select

from derms.api.auth import Principal, require
from derms.api.ids import DbId
from derms.api.json_body import StrictJsonRoute
from derms.api.paging import LongLimit as Limit
from derms.api.paging import Offset
from derms.api.problems import Problem
from derms.protocols.ieee2030_5.mappers import document_dict
from derms.protocols.ieee2030_5.model import (
    ControlRecord,
    ControlSpec,
    DefaultControlRecord,
    DerLimits,
    EndDeviceRecord,
    FsaRecord,
    ProgramRecord,
)
from derms.protocols.ieee2030_5.repository import SepAdminRepository
from derms.store.audit import append_audit
from derms.strict import StrictScalars

router = APIRouter(prefix="/ieee2030-5", tags=["ieee2030.5"],
                   route_class=StrictJsonRoute)
LFDI = r"^[0-9A-Fa-f]{40}$"
MRID = r"^[0-9A-Fa-f]{32}$"
UINT32 = 2**32 - 1
MAX_W = 32767 * 10**9  # the largest ActivePower (Int16 value, multiplier 9): larger is a 500 to devices
Power = Annotated[float | None, Field(default=None, ge=0, le=MAX_W, allow_inf_nan=False)]
# text served to devices in IEEE 2030.5 XML: XML 1.0 holds no C0 control other than tab, LF,
# CR (a description "a\x07b" was stored and every GET of the resource by a device was a 500)
XML_TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]*$"
ConnectionPointId = Annotated[str, Field(min_length=1, max_length=32, pattern=XML_TEXT)]


def _repo(request: Request) -> SepAdminRepository:
    repo = getattr(request.app.state, "ieee2030_5_repo", None)
    if repo is None:
        raise Problem(503, "the IEEE 2030.5 server is not enabled (derms serve "
                           "--ieee2030-5-port …)")
    return repo


Repo = Annotated[SepAdminRepository, Depends(_repo)]


def _write(request: Request, principal: Principal, action: str, entity: str, fn, *,
           entity_id=lambda r: "", detail: dict[str, Any] | None = None):
    """Run a repository write with its audit entry; repository ValueErrors become problems
    (409 for a duplicate, 404 for an unknown item named in the path, else 422)."""
    with request.app.state.sessions.begin() as s:
        try:
            result = fn()
        except KeyError as exc:
            raise Problem(404, str(exc.args[0] if exc.args else exc)) from None
        except ValueError as exc:
            text = str(exc)
            raise Problem(409 if "already" in text else 422, text) from None
        append_audit(s, actor=principal.token_id, action=action, entity=entity,
                     entity_id=str(entity_id(result)), detail=detail)
    return result


def _iso(t: datetime | None) -> str | None:
    # isoformat, not strftime("%Y…"): glibc writes year 1 as "1-01-01T…", not ISO 8601
    return None if t is None else \
        t.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def _aware(value: datetime, name: str = "start") -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone (e.g. 2026-01-01T00:00:00Z)")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it: a ValueError is a 422
        raise ValueError(f"{name} {value.isoformat()} is out of range in UTC") from None


# ----------------------------------------------------------------------------- end devices


class EndDeviceIn(StrictScalars):
    """Pre-register an end device (it may then register itself over TLS with its LFDI)."""

    model_config = ConfigDict(extra="forbid")
    lfdi: str = Field(pattern=LFDI, description="40 hex digits, from the device certificate")
    pin: int | None = Field(None, ge=0, le=UINT32, description="Registration PIN")
    connection_point: ConnectionPointId | None = Field(
        None, description="CSIP-AUS connection point id (NMI)")
    aggregator_lfdi: str | None = Field(None, pattern=LFDI,
                                        description="The aggregator that owns the device")
    fsa_ids: list[int] = Field(default_factory=list, max_length=100)
    der_id: str | None = Field(None, min_length=1, max_length=64, description=(
        "The DER device (in the store) its DER's mirrored readings are stored under"))
    meter_id: str | None = Field(None, min_length=1, max_length=64, description=(
        "The meter (in the store) its site MirrorUsagePoint's readings are stored under "
        "(default: a meter whose id is the connection point)"))


class AggregatorIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    lfdi: str = Field(pattern=LFDI)


def _edev_json(e: EndDeviceRecord) -> dict[str, Any]:
    return {"end_device_id": e.edev_id, "lfdi": e.lfdi, "sfdi": e.sfdi, "pin": e.pin,
            "connection_point": e.nmi, "aggregator_lfdi": e.owner_lfdi,
            "fsa_ids": list(e.fsa_ids), "enabled": e.enabled,
            "registered_time": _iso(e.registered_time), "changed_time": _iso(e.changed_time),
            "der_id": e.der_id, "meter_id": e.meter_id}


def _page(items: list, limit: int, offset: int, fmt) -> dict[str, Any]:
    return {"total": len(items), "limit": limit, "offset": offset,
            "items": [fmt(i) for i in items[offset:offset + limit]]}


@router.post("/end-devices", status_code=201)
def create_end_device(request: Request, body: EndDeviceIn, repo: Repo,
                      principal: Annotated[Principal, Depends(require("admin"))]
                      ) -> dict[str, Any]:
    """Pre-register an end device: LFDI, PIN, connection point (NMI), owning aggregator and
    function set assignments; ``der_id`` / ``meter_id``: where its mirrored readings are
    stored (422 unless they are in the store). 409 if the LFDI is registered already."""
    _check_store_ids(request, body.der_id, body.meter_id)
    rec = _write(request, principal, "create", "ieee2030_5_end_device",
                 lambda: repo.add_end_device(body.lfdi, pin=body.pin,
                                             owner_lfdi=body.aggregator_lfdi,
                                             nmi=body.connection_point, fsa_ids=body.fsa_ids,
                                             der_id=body.der_id, meter_id=body.meter_id),
                 entity_id=lambda r: r.lfdi, detail=body.model_dump())
    return _edev_json(rec)


class EndDevicesIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    end_devices: list[EndDeviceIn] = Field(min_length=1, max_length=10_000)


@router.post("/end-devices/batch", status_code=201)
def create_end_devices(request: Request, body: EndDevicesIn, repo: Repo,
                       principal: Annotated[Principal, Depends(require("admin"))]
                       ) -> dict[str, Any]:
    """Pre-register up to 10,000 end devices in one call, all or nothing (fleets,
    aggregators). An LFDI already registered is listed in ``existing`` and left as it is;
    a bad row (an unknown ``der_id``/``meter_id``/FSA, an LFDI given twice) is 422 naming
    its position, and nothing is stored."""
    from derms.store.models import DerDevice, Meter

    rows = body.end_devices
    with request.app.state.sessions() as s:
        for model, col, field in ((DerDevice, DerDevice.der_id, "der_id"),
                                  (Meter, Meter.meter_id, "meter_id")):
            wanted = {getattr(r, field) for r in rows} - {None}
            known = set(s.scalars(select(col).where(col.in_(wanted)))) if wanted else set()
            bad = [k for k, r in enumerate(rows) if getattr(r, field) not in known | {None}]
            if bad:
                raise Problem(422, f"end_devices[{bad[0]}].{field} "
                                   f"{getattr(rows[bad[0]], field)!r}: not in the store "
                                   f"({len(bad)} row(s) like this)")
    specs = [{"lfdi": r.lfdi, "pin": r.pin, "owner_lfdi": r.aggregator_lfdi,
              "nmi": r.connection_point, "fsa_ids": r.fsa_ids, "der_id": r.der_id,
              "meter_id": r.meter_id} for r in rows]
    results = _write(request, principal, "create", "ieee2030_5_end_devices",
                     lambda: repo.add_end_devices(specs), entity_id=lambda r: len(r),
                     detail={"lfdis": [r.lfdi.upper() for r in rows][:10_000]})
    return {"created": [_edev_json(e) for e, new in results if new],
            "existing": [e.lfdi for e, new in results if not new]}


def _check_store_ids(request: Request, der_id: str | None, meter_id: str | None) -> None:
    from derms.store.models import DerDevice, Meter

    with request.app.state.sessions() as s:
        for model, value, field, what in ((DerDevice, der_id, "der_id", "DER device"),
                                          (Meter, meter_id, "meter_id", "meter")):
            if value is not None and s.get(model, value) is None:
                raise Problem(422, f"{field} {value!r}: no such {what} in the store")


@router.get("/end-devices")
def list_end_devices(repo: Repo, _p: Annotated[Principal, Depends(require("read"))],
                     connection_point: str | None = None, limit: Limit = 100,
                     offset: Offset = 0) -> dict[str, Any]:
    recs = repo.end_devices_at(connection_point) if connection_point else repo.end_devices()
    return _page(recs, limit, offset, _edev_json)


@router.get("/end-devices/{end_device_id}")
def get_end_device(end_device_id: DbId, repo: Repo,
                   _p: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    rec = repo.end_device(end_device_id)
    if rec is None:
        raise Problem(404, f"unknown end device {end_device_id}")
    return _edev_json(rec)


DER_REPORTS = {"availability": "dera", "capability": "dercap", "settings": "derg",
               "status": "ders"}


@router.get("/end-devices/{end_device_id}/der/{report}")
def get_der_report(end_device_id: DbId, report: Literal["availability", "capability",
                                                        "settings", "status"],
                   repo: Repo, _p: Annotated[Principal, Depends(require("read"))]
                   ) -> dict[str, Any]:
    """The last DERAvailability / DERCapability / DERSettings / DERStatus the device PUT,
    as a plain view of the document (IEEE 2030.5 names and units: values with their
    power-of-ten ``multiplier``, times in epoch seconds)."""
    if repo.end_device(end_device_id) is None:
        raise Problem(404, f"unknown end device {end_device_id}")
    stored = repo.der_document(end_device_id, DER_REPORTS[report])
    if stored is None:
        raise Problem(404, f"end device {end_device_id} has not reported its DER {report}")
    xml, t = stored
    return {"end_device_id": end_device_id, "report": report, "received_time": _iso(t),
            "document": document_dict(etree.fromstring(xml))}


@router.get("/end-devices/{end_device_id}/mirror-usage-points")
def list_mirror_usage_points(end_device_id: DbId, repo: Repo,
                             _p: Annotated[Principal, Depends(require("read"))]
                             ) -> dict[str, Any]:
    """The MirrorUsagePoints posted for the end device and their reading types (the
    readings themselves are in the historian, source ``ieee2030_5``)."""
    from derms.protocols.ieee2030_5.mirror_map import target

    if repo.end_device(end_device_id) is None:
        raise Problem(404, f"unknown end device {end_device_id}")
    items = []
    for mup in repo.mirror_usage_points([end_device_id]):
        readings = []
        for r in mup.readings:
            tgt = target(r.reading_type, mup)
            readings.append({"mrid": r.mrid, "description": r.description,
                             "uom": r.reading_type.uom, "phase": r.reading_type.phase,
                             "flow_direction": r.reading_type.flow_direction,
                             "quantity": tgt.quantity if tgt else None})
        items.append({"mup_id": mup.mup_id, "mrid": mup.mrid, "role_flags": mup.role_flags,
                      "site": mup.is_site, "description": mup.description,
                      "creator_lfdi": mup.creator_lfdi, "post_rate_s": mup.post_rate_s,
                      "created_time": _iso(mup.created_time), "readings": readings})
    return {"end_device_id": end_device_id, "items": items}


@router.post("/aggregators", status_code=201)
def create_aggregator(request: Request, body: AggregatorIn, repo: Repo,
                      principal: Annotated[Principal, Depends(require("admin"))]
                      ) -> dict[str, Any]:
    """Let the client with this LFDI register the end devices behind it."""
    _write(request, principal, "create", "ieee2030_5_aggregator",
           lambda: repo.add_aggregator(body.lfdi), entity_id=lambda _r: body.lfdi.upper())
    return {"lfdi": body.lfdi.upper()}


@router.get("/aggregators")
def list_aggregators(repo: Repo, _p: Annotated[Principal, Depends(require("read"))]
                     ) -> dict[str, Any]:
    return {"items": repo.aggregators()}


# ----------------------------------------------------------------------------- programs, FSAs


class ProgramIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    description: str = Field("", max_length=32, pattern=XML_TEXT)
    primacy: int = Field(ge=0, le=255, description="Lower wins (IEEE 2030.5 primacy)")


class FsaIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    description: str = Field("", max_length=32, pattern=XML_TEXT)
    program_ids: list[int] = Field(default_factory=list, max_length=100)


class FsaAssignIn(StrictScalars):
    """A group of end devices: by id and/or every device at the given connection points."""

    model_config = ConfigDict(extra="forbid")
    end_device_ids: list[int] = Field(default_factory=list, max_length=100_000)
    connection_points: list[ConnectionPointId] = Field(default_factory=list,
                                                       max_length=100_000)

    @model_validator(mode="after")
    def _some(self) -> FsaAssignIn:
        if not self.end_device_ids and not self.connection_points:
            raise ValueError("give end_device_ids or connection_points")
        return self


def _program_json(p: ProgramRecord) -> dict[str, Any]:
    return {"program_id": p.program_id, "mrid": p.mrid, "description": p.description,
            "primacy": p.primacy, "version": p.version}


def _fsa_json(f: FsaRecord) -> dict[str, Any]:
    return {"fsa_id": f.fsa_id, "mrid": f.mrid, "description": f.description,
            "program_ids": list(f.program_ids), "version": f.version}


@router.post("/programs", status_code=201)
def create_program(request: Request, body: ProgramIn, repo: Repo,
                   principal: Annotated[Principal, Depends(require("admin"))]
                   ) -> dict[str, Any]:
    """Create a DERProgram (reach devices through a function set assignment)."""
    rec = _write(request, principal, "create", "ieee2030_5_program",
                 lambda: repo.add_program(body.description, body.primacy),
                 entity_id=lambda r: r.program_id, detail=body.model_dump())
    return _program_json(rec)


@router.get("/programs")
def list_programs(repo: Repo, _p: Annotated[Principal, Depends(require("read"))],
                  limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    return _page(repo.programs(), limit, offset, _program_json)


@router.post("/function-set-assignments", status_code=201)
def create_fsa(request: Request, body: FsaIn, repo: Repo,
               principal: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    """Create a FunctionSetAssignments grouping DER programs."""
    rec = _write(request, principal, "create", "ieee2030_5_fsa",
                 lambda: repo.add_fsa(body.description, body.program_ids),
                 entity_id=lambda r: r.fsa_id, detail=body.model_dump())
    return _fsa_json(rec)


@router.get("/function-set-assignments")
def list_fsas(repo: Repo, _p: Annotated[Principal, Depends(require("read"))],
              limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    return _page(repo.fsas(), limit, offset, _fsa_json)


@router.post("/function-set-assignments/{fsa_id}/end-devices")
def assign_fsa(request: Request, fsa_id: DbId, body: FsaAssignIn, repo: Repo,
               principal: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    """Assign a function set to a group of end devices (ids and/or connection points); all
    or nothing: an unknown device or a connection point without devices is 422."""
    if repo.fsa(fsa_id) is None:
        raise Problem(404, f"unknown function set assignment {fsa_id}")
    ids = list(dict.fromkeys(body.end_device_ids))
    unknown = [i for i in ids if repo.end_device(i) is None]
    if unknown:
        raise Problem(422, f"unknown end device {unknown[0]}", unknown_end_devices=unknown)
    empty = []
    for cp in body.connection_points:
        at = repo.end_devices_at(cp)
        if not at:
            empty.append(cp)
        ids += [e.edev_id for e in at if e.edev_id not in ids]
    if empty:
        raise Problem(422, f"no end device registered at connection point {empty[0]!r}",
                      unmatched_connection_points=empty)

    def assign() -> list[int]:
        for i in ids:
            repo.assign_fsa(i, fsa_id)
        return ids

    _write(request, principal, "assign", "ieee2030_5_fsa", assign,
           entity_id=lambda _r: fsa_id, detail={"end_device_ids": ids})
    return {"fsa_id": fsa_id, "end_device_ids": ids}


# ----------------------------------------------------------------------------- controls


class LimitsIn(StrictScalars):
    """DERControlBase: CSIP-AUS limits in W (>= 0) and the connect/energize flags."""

    model_config = ConfigDict(extra="forbid")
    export_limit_w: Power = None
    import_limit_w: Power = None
    generation_limit_w: Power = None
    load_limit_w: Power = None
    connect: bool | None = None
    energize: bool | None = None
    volt_var_curve_id: DbId | None = Field(None, description="a volt-var DERCurve of the "
                                          "program (POST …/programs/{id}/curves)")
    volt_watt_curve_id: DbId | None = None
    freq_watt_curve_id: DbId | None = None

    def limits(self) -> DerLimits:
        return DerLimits(exp_lim_w=self.export_limit_w, imp_lim_w=self.import_limit_w,
                         gen_lim_w=self.generation_limit_w, load_lim_w=self.load_limit_w,
                         connect=self.connect, energize=self.energize,
                         volt_var_curve_id=self.volt_var_curve_id,
                         volt_watt_curve_id=self.volt_watt_curve_id,
                         freq_watt_curve_id=self.freq_watt_curve_id)

    @model_validator(mode="after")
    def _some(self):
        if self.limits() == DerLimits():
            raise ValueError("give at least one limit (export_limit_w, import_limit_w, "
                             "generation_limit_w, load_limit_w), connect/energize or a "
                             "curve (volt_var_curve_id, volt_watt_curve_id, "
                             "freq_watt_curve_id)")
        return self


class ControlIn(LimitsIn):
    """A scheduled DERControl event in [start, start + duration_s). Audience: every device
    the program is assigned to, or one end device, or the devices at one connection point."""

    start: datetime
    duration_s: int = Field(ge=1, le=UINT32)
    randomize_start_s: int | None = Field(None, ge=-32768, le=32767)
    randomize_duration_s: int | None = Field(None, ge=-32768, le=32767)
    end_device_id: DbId | None = None
    connection_point: ConnectionPointId | None = None
    description: str = Field("", max_length=32, pattern=XML_TEXT)
    mrid: str | None = Field(None, pattern=MRID, description="default: assigned")

    @field_validator("start")
    @classmethod
    def _start_aware(cls, value: datetime) -> datetime:
        return _aware(value)

    @model_validator(mode="after")
    def _ends_in_range(self) -> ControlIn:
        try:
            self.start + timedelta(seconds=self.duration_s)
        except OverflowError:
            raise ValueError("start + duration_s is beyond year 9999") from None
        return self

    @model_validator(mode="after")
    def _one_audience(self) -> ControlIn:
        if self.end_device_id is not None and self.connection_point is not None:
            raise ValueError("give end_device_id or connection_point, not both")
        return self


class DefaultControlIn(LimitsIn):
    description: str = Field("", max_length=32, pattern=XML_TEXT)
    set_grad_w: int | None = Field(None, ge=0, le=65535, description=(
        "ramp rate, hundredths of a percent of the rating per second"))


def _limits_json(lim: DerLimits) -> dict[str, Any]:
    return {"export_limit_w": lim.exp_lim_w, "import_limit_w": lim.imp_lim_w,
            "generation_limit_w": lim.gen_lim_w, "load_limit_w": lim.load_lim_w,
            "connect": lim.connect, "energize": lim.energize,
            "volt_var_curve_id": lim.volt_var_curve_id,
            "volt_watt_curve_id": lim.volt_watt_curve_id,
            "freq_watt_curve_id": lim.freq_watt_curve_id}


def _status(c: ControlRecord, now: datetime) -> str:
    if c.cancelled_time is not None:
        return "cancelled"
    end = c.start.timestamp() + c.duration_s
    if now.timestamp() >= end:
        return "completed"
    return "active" if now >= c.start else "scheduled"


def _control_json(c: ControlRecord, now: datetime | None = None) -> dict[str, Any]:
    return {"control_id": c.control_id, "mrid": c.mrid, "program_id": c.program_id,
            "start": _iso(c.start), "duration_s": c.duration_s,
            "randomize_start_s": c.randomize_start_s,
            "randomize_duration_s": c.randomize_duration_s,
            "end_device_id": c.edev_id, "connection_point": c.connection_point,
            "description": c.description, **_limits_json(c.limits),
            "creation_time": _iso(c.creation_time), "cancelled_time": _iso(c.cancelled_time),
            "version": c.version, "status": _status(c, now or datetime.now(UTC))}


def _default_json(d: DefaultControlRecord) -> dict[str, Any]:
    return {"program_id": d.program_id, "mrid": d.mrid, "description": d.description,
            "version": d.version, "set_grad_w": d.set_grad_w, **_limits_json(d.limits)}


def _program_or_404(repo: SepAdminRepository, program_id: DbId) -> ProgramRecord:
    program = repo.program(program_id)
    if program is None:
        raise Problem(404, f"unknown DER program {program_id}")
    return program


@router.post("/programs/{program_id}/controls", status_code=201)
def create_control(request: Request, response: Response, program_id: DbId, body: ControlIn,
                   repo: Repo, principal: Annotated[Principal, Depends(require("operate"))]
                   ) -> dict[str, Any]:
    """Schedule a DERControl (201); re-posting the same ``mrid`` with the same content is
    idempotent: 200 and the same record (it was a 201 too), with other content 409."""
    _program_or_404(repo, program_id)
    spec = ControlSpec(program_id, body.start, body.duration_s, body.limits(),
                       body.description, body.end_device_id, body.connection_point,
                       body.randomize_start_s, body.randomize_duration_s, body.mrid)
    (rec, created), = _write(request, principal, "create", "ieee2030_5_control",
                             lambda: repo.add_controls([spec]),
                             entity_id=lambda r: r[0][0].mrid,
                             detail=body.model_dump(mode="json"))
    if not created:
        response.status_code = 200
    return _control_json(rec)


@router.get("/programs/{program_id}/controls")
def list_controls(program_id: DbId, repo: Repo,
                  _p: Annotated[Principal, Depends(require("read"))],
                  connection_point: str | None = None, end_device_id: DbId | None = None,
                  limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    """The program's controls by start (completed ones too), optionally one audience's."""
    _program_or_404(repo, program_id)
    recs = repo.controls(program_id)
    if connection_point is not None:
        recs = [c for c in recs if c.connection_point == connection_point]
    if end_device_id is not None:
        recs = [c for c in recs if c.edev_id == end_device_id]
    recs.sort(key=lambda c: (c.start, c.control_id))
    now = datetime.now(UTC)
    return _page(recs, limit, offset, lambda c: _control_json(c, now))


@router.post("/controls/{control_id}/cancel")
def cancel_control(request: Request, control_id: DbId, repo: Repo,
                   principal: Annotated[Principal, Depends(require("operate"))]
                   ) -> dict[str, Any]:
    """Cancel a DERControl (devices see EventStatus 2 "cancelled")."""
    rec = _write(request, principal, "cancel", "ieee2030_5_control",
                 lambda: repo.cancel_control(control_id), entity_id=lambda r: r.mrid)
    return _control_json(rec)


RESPONSE_STATUS = {1: "received", 2: "started", 3: "completed", 4: "opt_out", 5: "opt_in",
                   6: "cancelled", 7: "superseded", 8: "partial_opt_out", 9: "partial_opt_in",
                   10: "completed_no_participation", 13: "superseded_alternate_server",
                   14: "superseded_alternate_program", 252: "rejected_not_applicable",
                   253: "rejected_invalid", 254: "rejected_expired"}


@router.get("/controls/{control_id}/responses")
def list_responses(control_id: DbId, repo: Repo,
                   _p: Annotated[Principal, Depends(require("read"))],
                   limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    """What the devices answered to a DERControl (IEEE 2030.5 Response status codes)."""
    if repo.control(control_id) is None:
        raise Problem(404, f"unknown DERControl {control_id}")
    return _page(repo.responses(control_id=control_id), limit, offset, lambda r: {
        "response_id": r.response_id, "mrid": r.mrid, "end_device_id": r.edev_id,
        "lfdi": r.lfdi, "status": r.status, "status_name": RESPONSE_STATUS.get(r.status),
        "created_time": _iso(r.created_time), "received_time": _iso(r.received_time)})


@router.put("/programs/{program_id}/default-control")
def put_default_control(request: Request, program_id: DbId, body: DefaultControlIn, repo: Repo,
                        principal: Annotated[Principal, Depends(require("admin"))]
                        ) -> dict[str, Any]:
    """Set the program's DefaultDERControl (what devices apply when no event is active)."""
    _program_or_404(repo, program_id)
    rec = _write(request, principal, "set", "ieee2030_5_default_control",
                 lambda: repo.set_default_control(program_id, body.limits(),
                                                  description=body.description,
                                                  set_grad_w=body.set_grad_w),
                 entity_id=lambda r: r.mrid, detail=body.model_dump())
    return _default_json(rec)


@router.get("/programs/{program_id}/default-control")
def get_default_control(program_id: DbId, repo: Repo,
                        _p: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    _program_or_404(repo, program_id)
    rec = repo.default_control(program_id)
    if rec is None:
        raise Problem(404, f"DER program {program_id} has no default control")
    return _default_json(rec)
