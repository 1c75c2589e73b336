"""IEEE 2030.5 management: operating envelopes published as DERControls.

Operating envelopes become DERControls through ``POST …/programs/{id}/envelopes``: the
body's ``site_controls`` are the rows of ``EnvelopeResult.site_controls()`` (or the
``site_controls`` object of ``POST /v1/envelopes`` as is); each row becomes one DERControl,
mRID = the row's ``mrid``, seen by the end devices registered at the row's connection point.
Scope ``operate``; audited (see :mod:`derms.api.routes_ieee2030_5`).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field

from derms.api.auth import Principal, require
from derms.api.ids import DbId
from derms.api.json_body import StrictJsonRoute
from derms.api.problems import Problem
from derms.api.routes_ieee2030_5 import MAX_W, UINT32, XML_TEXT, Repo, _program_or_404, _write
from derms.protocols.ieee2030_5.model import ControlSpec, DerLimits, EndDeviceRecord
from derms.protocols.ieee2030_5.repository import SepAdminRepository
from derms.strict import StrictScalars

router = APIRouter(prefix="/ieee2030-5", tags=["ieee2030.5"],
                   route_class=StrictJsonRoute)


class SiteControlRow(StrictScalars):
    """One row of ``EnvelopeResult.site_controls()``."""

    model_config = ConfigDict(extra="forbid")
    mrid: str
    connection_point: str
    start: datetime
    duration_s: int
    export_limit_w: float | None = None
    import_limit_w: float | None = None


class SiteControlColumns(StrictScalars):
    """The same rows as columns (the ``site_controls`` object ``POST /v1/envelopes``
    answers with; its paging fields are accepted and ignored)."""

    model_config = ConfigDict(extra="forbid")
    mrid: list[str]
    connection_point: list[str]
    start: list[datetime]
    duration_s: list[int]
    export_limit_w: list[float | None]
    import_limit_w: list[float | None]
    total: int | None = None
    offset: int | None = None
    limit: int | None = None
    rows: int | None = None

    def as_rows(self) -> list[dict[str, Any]]:
        names = ("mrid", "connection_point", "start", "duration_s", "export_limit_w",
                 "import_limit_w")
        cols = [getattr(self, n) for n in names]
        if len({len(c) for c in cols}) != 1:
            raise Problem(422, "site_controls columns differ in length: " + ", ".join(
                f"{n} {len(c)}" for n, c in zip(names, cols, strict=True)))
        return [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)]


class EnvelopeControlsIn(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    site_controls: list[SiteControlRow] | SiteControlColumns = Field(description=(
        "rows (mrid, connection_point, start, duration_s, export_limit_w, import_limit_w "
        "[W]) or the same as columns"))
    description: str = Field("operating envelope", max_length=32, pattern=XML_TEXT)


def _row_errors(k: int, row: dict[str, Any]) -> list[dict[str, Any]]:
    errors = []

    def bad(field: str, detail: str) -> None:
        errors.append({"row": k, "field": field, "detail": detail})

    mrid = row["mrid"]
    if len(mrid) != 32 or any(c not in "0123456789ABCDEFabcdef" for c in mrid):
        bad("mrid", f"{mrid!r}: expected 32 hex digits")
    if not 0 < len(row["connection_point"]) <= 32:
        bad("connection_point", "expected 1..32 characters")
    elif not re.match(XML_TEXT, row["connection_point"]):
        bad("connection_point", "holds a control character XML cannot carry")
    if row["start"].tzinfo is None:
        bad("start", "must carry a time zone")
    else:
        try:
            row["start"].astimezone(UTC) + timedelta(seconds=max(0, row["duration_s"]))
        except OverflowError:
            bad("start", f"{row['start'].isoformat()}: start or start + duration_s is out of "
                "range")
    if not 1 <= row["duration_s"] <= UINT32:
        bad("duration_s", f"{row['duration_s']}: expected 1 .. 2^32-1")
    for name in ("export_limit_w", "import_limit_w"):
        value = row[name]
        if value is not None and math.isnan(value):  # NaN: a direction not computed
            row[name] = value = None
        if value is not None and not (abs(value) != float("inf") and 0 <= value <= MAX_W):
            bad(name, f"{value!r}: expected a finite value from 0 to {MAX_W:g} W or null")
    if row["export_limit_w"] is None and row["import_limit_w"] is None:
        bad("export_limit_w", "neither export_limit_w nor import_limit_w is given")
    return errors


@router.post("/programs/{program_id}/envelopes")
def publish_envelopes(request: Request, program_id: DbId, body: EnvelopeControlsIn,
                      repo: Repo, principal: Annotated[Principal, Depends(require("operate"))]
                      ) -> dict[str, Any]:
    """Operating envelopes become DERControls: one per row (mRID = the row's ``mrid``,
    opModExpLimW / opModImpLimW = its limits), seen by the end devices registered at the
    row's connection point. All or nothing: any bad row → 422 listing every bad row.
    Rows whose connection point has no registered end device are not stored and are
    listed in ``unmatched_connection_points``; publishing the same rows again stores
    nothing twice (``unchanged``)."""
    _program_or_404(repo, program_id)
    rows = (body.site_controls.as_rows() if isinstance(body.site_controls, SiteControlColumns)
            else [r.model_dump() for r in body.site_controls])
    errors = [e for k, row in enumerate(rows) for e in _row_errors(k, row)]
    if errors:
        raise Problem(422, f"{len(errors)} bad site control row(s); nothing published",
                      type_="invalid-batch", errors=errors[:1000], rows=len(rows), accepted=0)
    devices: dict[str, list[EndDeviceRecord]] = {}
    for cp in dict.fromkeys(r["connection_point"] for r in rows):
        devices[cp] = repo.end_devices_at(cp)
    unmatched = [cp for cp, devs in devices.items() if not devs]
    specs = [ControlSpec(program_id, row["start"], row["duration_s"],
                         DerLimits(exp_lim_w=row["export_limit_w"],
                                   imp_lim_w=row["import_limit_w"]),
                         body.description, connection_point=row["connection_point"],
                         mrid=row["mrid"])
             for row in rows if devices[row["connection_point"]]]
    results = _write(request, principal, "publish", "ieee2030_5_envelopes",
                     lambda: repo.add_controls(specs), entity_id=lambda _r: program_id,
                     detail={"rows": len(rows), "unmatched_connection_points": unmatched[:100]})
    matched = [e for devs in devices.values() for e in devs]
    without_program = [e.edev_id for e in matched if not _has_program(repo, e, program_id)]
    created = sum(1 for _, new in results if new)
    return {"program_id": program_id, "rows": len(rows), "published": len(results),
            "created": created, "unchanged": len(results) - created,
            "end_device_ids": [e.edev_id for e in matched],
            "unmatched_connection_points": unmatched,
            "end_devices_without_program": without_program}


def _has_program(repo: SepAdminRepository, rec: EndDeviceRecord, program_id: DbId) -> bool:
    for fsa_id in rec.fsa_ids:
        fsa = repo.fsa(fsa_id)
        if fsa is not None and program_id in fsa.program_ids:
            return True
    return False
