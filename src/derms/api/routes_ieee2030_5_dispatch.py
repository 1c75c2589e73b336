"""Dispatch plans become IEEE 2030.5 DERControls (issue 8: "dispatch plans and operating
envelopes become DERControls through it").

``POST /v1/ieee2030-5/programs/{id}/dispatch`` takes the columns of a plan's
``schedule.csv`` (``derms dispatch``; ``der_id, kind, timestamp, p_kw[, curtail_kw]``,
``p_kw`` = the DER's net import in kW, so a discharging battery is negative). Each row whose
interval has not ended becomes one DERControl for the end devices pre-registered with that
``der_id``:

* batteries, EV chargers, flexible loads and generators: ``opModTargetW`` = −``p_kw`` ×
  1000 W (IEEE 2030.5 sign: positive = generating/discharging);
* PV: ``opModGenLimW`` = the planned output when the plan curtails it (``curtail_kw`` > 1 W),
  else no control (the inverter runs free).

The interval is ``step_s`` (default: the smallest gap between a DER's consecutive
timestamps). mRIDs are derived from the program, DER, interval and value, so publishing the
same plan twice stores nothing twice, and a re-plan that changes a value publishes a newer
event that supersedes the old one for that interval (IEEE 2030.5 supersession).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field

from derms.api.auth import Principal, require
from derms.api.ids import DbId
from derms.api.json_body import StrictJsonRoute
from derms.api.problems import Problem
from derms.api.routes_ieee2030_5 import MAX_W, UINT32, XML_TEXT, Repo, _program_or_404, _write
from derms.protocols.ieee2030_5.model import ControlSpec, DerLimits
from derms.strict import StrictScalars

router = APIRouter(prefix="/ieee2030-5", tags=["ieee2030.5"],
                   route_class=StrictJsonRoute)
PV_KINDS = frozenset({"pv"})
MIN_CURTAIL_KW = 0.001


class ScheduleColumns(StrictScalars):
    """Columns of ``schedule.csv`` (equal lengths)."""

    model_config = ConfigDict(extra="ignore")
    der_id: list[str]
    timestamp: list[datetime]
    p_kw: list[float]
    kind: list[str] | None = None
    curtail_kw: list[float | None] | None = None


class DispatchControlsIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    schedule: ScheduleColumns
    step_s: int | None = Field(None, ge=1, le=UINT32, description=(
        "interval length; default: the smallest gap between a DER's timestamps"))
    description: str = Field("dispatch", max_length=32, pattern=XML_TEXT)


def _step_s(der: np.ndarray, t: np.ndarray) -> int | None:
    gaps = [np.diff(np.unique(t[der == d])) for d in np.unique(der)]
    gaps = np.concatenate(gaps) if gaps else np.array([])
    gaps = gaps[gaps > 0]
    return int(gaps.min()) if gaps.size else None


def _mrid(program_id: DbId, der_id: str, start: int, step: int, limits: DerLimits) -> str:
    key = f"{program_id}|{der_id}|{start}|{step}|{limits.target_w!r}|{limits.gen_lim_w!r}"
    return hashlib.sha256(key.encode()).hexdigest()[:32].upper()


@router.post("/programs/{program_id}/dispatch")
def publish_dispatch(request: Request, program_id: DbId, body: DispatchControlsIn, repo: Repo,
                     principal: Annotated[Principal, Depends(require("operate"))]
                     ) -> dict[str, Any]:
    """Publish a dispatch plan's setpoints as DERControls (see the module doc). All or
    nothing: a bad row (no time zone, non-finite power, unequal columns) is 422; DERs with no
    registered end device are listed in ``unmatched_der_ids`` and not published."""
    _program_or_404(repo, program_id)
    cols = body.schedule
    n = len(cols.der_id)
    lengths = {"der_id": n, "timestamp": len(cols.timestamp), "p_kw": len(cols.p_kw)}
    if cols.kind is not None:
        lengths["kind"] = len(cols.kind)
    if cols.curtail_kw is not None:
        lengths["curtail_kw"] = len(cols.curtail_kw)
    if len(set(lengths.values())) != 1:
        raise Problem(422, "schedule columns differ in length: " + ", ".join(
            f"{k} {v}" for k, v in lengths.items()))
    errors = [{"row": k, "field": "timestamp", "detail": "must carry a time zone"}
              for k, t in enumerate(cols.timestamp) if t.tzinfo is None]
    errors += [{"row": k, "field": "p_kw", "detail": f"{p!r}: not a finite number"}
               for k, p in enumerate(cols.p_kw) if not np.isfinite(p)]
    errors += [{"row": k, "field": "p_kw", "detail": f"{p!r}: beyond what IEEE 2030.5 "
                f"ActivePower can carry ({MAX_W / 1000:g} kW)"}
               for k, p in enumerate(cols.p_kw) if np.isfinite(p) and abs(p) * 1000.0 > MAX_W]
    step_max = body.step_s or UINT32
    for k, x in enumerate(cols.timestamp):
        if x.tzinfo is None:
            continue
        try:
            x.astimezone(UTC) - timedelta(seconds=1)
            x.astimezone(UTC) + timedelta(seconds=step_max)
        except OverflowError:
            errors.append({"row": k, "field": "timestamp", "detail": f"{x.isoformat()}: "
                           "the interval is out of range (years 1..9999 in UTC)"})
    if errors:
        raise Problem(422, f"{len(errors)} bad schedule row(s); nothing published",
                      type_="invalid-batch", errors=errors[:1000], rows=n, accepted=0)
    der = np.array(cols.der_id, dtype=object)
    t = np.array([int(x.timestamp()) for x in cols.timestamp], dtype=np.int64)
    step = body.step_s or _step_s(der, t)
    if step is None:
        raise Problem(422, "step_s: give it (every DER has a single timestamp)")
    devices: dict[str, list[int]] = {}
    for e in repo.end_devices():
        if e.der_id is not None:
            devices.setdefault(e.der_id, []).append(e.edev_id)
    now_s = int(datetime.now(UTC).timestamp())
    specs: list[ControlSpec] = []
    skipped_past = skipped_free = 0
    unmatched = sorted({d for d in cols.der_id if d not in devices})
    for k in range(n):
        if t[k] + step <= now_s:
            skipped_past += 1
            continue
        if cols.der_id[k] not in devices:
            continue
        kind = (cols.kind[k] if cols.kind is not None else "").lower()
        curtail = cols.curtail_kw[k] if cols.curtail_kw is not None else None
        if kind in PV_KINDS:
            if curtail is None or not curtail > MIN_CURTAIL_KW:
                skipped_free += 1
                continue
            limits = DerLimits(gen_lim_w=max(0.0, -cols.p_kw[k]) * 1000.0)
        else:
            limits = DerLimits(target_w=-cols.p_kw[k] * 1000.0)
        start = datetime.fromtimestamp(int(t[k]), UTC)
        for edev_id in devices[cols.der_id[k]]:
            specs.append(ControlSpec(program_id, start, step, limits, body.description,
                                     edev_id=edev_id,
                                     mrid=_mrid(program_id, f"{cols.der_id[k]}#{edev_id}",
                                                int(t[k]), step, limits)))
    results = _write(request, principal, "publish", "ieee2030_5_dispatch",
                     lambda: repo.add_controls(specs), entity_id=lambda _r: program_id,
                     detail={"rows": n, "step_s": step, "unmatched_der_ids": unmatched[:100]})
    created = sum(1 for _, new in results if new)
    return {"program_id": program_id, "rows": n, "step_s": step, "published": len(results),
            "created": created, "unchanged": len(results) - created,
            "skipped_past": skipped_past, "skipped_pv_not_curtailed": skipped_free,
            "unmatched_der_ids": unmatched,
            "until": (datetime.fromtimestamp(int(t.max()) + step, UTC).isoformat()
                      if n else None)}
