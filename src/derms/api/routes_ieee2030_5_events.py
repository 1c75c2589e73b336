"""IEEE 2030.5 management, part two: DER curves, what devices log and subscribe to, and each
device's delivery record (see :mod:`derms.api.routes_ieee2030_5` for the conventions:
the same repository, scopes and problem details).

Curves: ``POST /programs/{id}/curves`` adds a volt-var, volt-watt or freq-watt DERCurve to a
program (x: % of nominal voltage, or Hz for freq-watt; y: % of the reference named by
``y_reference``); controls and default controls turn it on with ``volt_var_curve_id`` /
``volt_watt_curve_id`` / ``freq_watt_curve_id``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field

from derms.api.auth import Principal, require
from derms.api.ids import DbId
from derms.api.json_body import StrictJsonRoute
from derms.api.problems import Problem
from derms.api.routes_ieee2030_5 import (
    XML_TEXT,
    Limit,
    Offset,
    Repo,
    _iso,
    _page,
    _program_or_404,
    _write,
)
from derms.protocols.ieee2030_5.delivery import DeliveryRecord, delivery_record
from derms.protocols.ieee2030_5.model import CURVE_TYPES, CurveRecord
from derms.strict import StrictScalars

router = APIRouter(prefix="/ieee2030-5", tags=["ieee2030.5"],
                   route_class=StrictJsonRoute)

#: DERUnitRefType codes by name
Y_REFERENCES = {"set_max_w": 1, "set_max_var": 2, "stat_var_avail": 3, "set_effective_v": 4,
                "set_max_charge_rate_w": 5, "set_max_discharge_rate_w": 6, "stat_w_avail": 7}
Hundredths = Annotated[int | None, Field(None, ge=0, le=65535)]


class CurveIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["volt_var", "volt_watt", "freq_watt"]
    x: list[float] = Field(min_length=1, max_length=10, description=(
        "increasing; % of nominal voltage (volt-var, volt-watt) or Hz (freq-watt)"))
    y: list[float] = Field(min_length=1, max_length=10, description="% of y_reference")
    y_reference: Literal[tuple(Y_REFERENCES)] | None = Field(None, description=(
        "default: set_max_var for volt-var, set_max_w otherwise"))
    description: str = Field("", max_length=32, pattern=XML_TEXT)
    ramp_dec_tms: Hundredths = None
    ramp_inc_tms: Hundredths = None
    open_loop_tms: Hundredths = Field(None, description="response time (rampPT1Tms), "
                                      "hundredths of a second")


def _curve_json(c: CurveRecord) -> dict[str, Any]:
    kind = next((k for k, v in CURVE_TYPES.items() if v == c.curve_type), str(c.curve_type))
    ref = next((k for k, v in Y_REFERENCES.items() if v == c.y_ref_type), str(c.y_ref_type))
    return {"curve_id": c.curve_id, "program_id": c.program_id, "mrid": c.mrid, "kind": kind,
            "x": list(c.x), "y": list(c.y), "y_reference": ref, "description": c.description,
            "ramp_dec_tms": c.ramp_dec_tms, "ramp_inc_tms": c.ramp_inc_tms,
            "open_loop_tms": c.ramp_pt1_tms, "creation_time": _iso(c.creation_time)}


@router.post("/programs/{program_id}/curves", status_code=201)
def create_curve(request: Request, program_id: DbId, body: CurveIn, repo: Repo,
                 principal: Annotated[Principal, Depends(require("admin"))]
                 ) -> dict[str, Any]:
    """Add a DERCurve to a program (curves are immutable: a new shape is a new curve)."""
    _program_or_404(repo, program_id)
    ref = body.y_reference or ("set_max_var" if body.kind == "volt_var" else "set_max_w")
    rec = _write(request, principal, "create", "ieee2030_5_curve",
                 lambda: repo.add_curve(program_id, CURVE_TYPES[body.kind], body.x, body.y,
                                        Y_REFERENCES[ref], description=body.description,
                                        ramp_dec_tms=body.ramp_dec_tms,
                                        ramp_inc_tms=body.ramp_inc_tms,
                                        ramp_pt1_tms=body.open_loop_tms),
                 entity_id=lambda r: r.mrid, detail=body.model_dump(mode="json"))
    return _curve_json(rec)


@router.get("/programs/{program_id}/curves")
def list_curves(program_id: DbId, repo: Repo, _p: Annotated[Principal, Depends(require("read"))],
                limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    _program_or_404(repo, program_id)
    return _page(repo.curves(program_id), limit, offset, _curve_json)


def _edev_or_404(repo, end_device_id: DbId):
    rec = repo.end_device(end_device_id)
    if rec is None:
        raise Problem(404, f"unknown end device {end_device_id}")
    return rec


@router.get("/end-devices/{end_device_id}/log-events")
def list_log_events(end_device_id: DbId, repo: Repo,
                    _p: Annotated[Principal, Depends(require("read"))],
                    limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    """What the device logged (LogEvent POSTs), newest first."""
    _edev_or_404(repo, end_device_id)
    return _page(repo.log_events(end_device_id), limit, offset, lambda r: {
        "log_event_id": r.log_event_id, "created_time": _iso(r.created_time),
        "received_time": _iso(r.received_time), "function_set": r.function_set,
        "log_event_code": r.log_event_code, "device_log_event_id": r.device_log_event_id,
        "log_event_pen": r.log_event_pen, "profile_id": r.profile_id, "details": r.details,
        "extended_data": r.extended_data})


@router.get("/end-devices/{end_device_id}/subscriptions")
def list_subscriptions(request: Request, end_device_id: DbId, repo: Repo,
                       _p: Annotated[Principal, Depends(require("read"))],
                       limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    """The device's subscriptions and how their notifications were delivered."""
    _edev_or_404(repo, end_device_id)
    notifier = getattr(request.app.state, "ieee2030_5_notifier", None)
    states = notifier.status() if notifier is not None else {}

    def fmt(r) -> dict[str, Any]:
        st = states.get(r.subscription_id)
        return {"subscription_id": r.subscription_id, "subscribed_resource":
                r.subscribed_resource, "notification_uri": r.notification_uri,
                "limit": r.limit, "created_time": _iso(r.created_time),
                "delivered": st.delivered if st else 0,
                "last_delivered": _iso(st.last_delivered) if st else None,
                "failed_attempts": st.attempts if st else 0,
                "last_error": st.last_error if st else None}

    return _page(repo.subscriptions(end_device_id), limit, offset, fmt)


def _delivery_json(d: DeliveryRecord) -> dict[str, Any]:
    return {"end_device_id": d.edev_id, "lfdi": d.lfdi, "events": d.events,
            "acknowledged": d.acknowledged, "completed": d.completed, "declined": d.declined,
            "rejected": d.rejected, "unanswered": d.unanswered,
            "median_ack_s": d.median_ack_s, "score": round(d.score, 4)}


@router.get("/end-devices/{end_device_id}/delivery")
def get_delivery(end_device_id: DbId, repo: Repo,
                 _p: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    """The device's delivery record: events due a response, how it answered, its score."""
    return _delivery_json(delivery_record(repo, _edev_or_404(repo, end_device_id),
                                          datetime.now(UTC)))


@router.get("/delivery")
def list_delivery(repo: Repo, _p: Annotated[Principal, Depends(require("read"))],
                  limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    """Every end device's delivery record, lowest score first (who to look at)."""
    now = datetime.now(UTC)
    records = sorted((delivery_record(repo, e, now) for e in repo.end_devices()),
                     key=lambda d: (d.score, d.edev_id))
    return _page(records, limit, offset, _delivery_json)
