"""Available capacity on demand: hosting capacity, operating envelopes, interconnection.

``POST /v1/hosting-capacity`` (read scope), ``POST /v1/envelopes`` (operate scope: the
result is meant to be published to devices), ``POST /v1/interconnect`` (read scope). Each
body names a bundled feeder; the work runs in the engine process pool (one OpenDSS
context per worker process) and is the same as the CLI commands ``derms
hosting-capacity``, ``derms envelopes`` and ``derms interconnect``. Units and sign
conventions as in docs/data-formats.md; timestamps UTC ISO 8601, interval starts. Bad
bodies -> 422 problem+json; an unknown bus or load -> 422 naming it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ConfigDict, Field, field_validator

from derms.analysis.constraints import MAX_SIZE_KW
from derms.api.auth import Principal, require
from derms.api.downloads import Download, columns_frame, table_response
from derms.api.ids import DbId
from derms.api.json_body import StrictJsonRoute
from derms.api.paging import Offset
from derms.api.problems import Problem
from derms.errors import DermsError, InfeasibleError
from derms.strict import StrictScalars

router = APIRouter(tags=["capacity"], route_class=StrictJsonRoute)
Feeder = Literal["ieee13", "ieee123", "ieee8500"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _columns(frame, offset: int, limit: int) -> dict[str, Any]:
    page = frame.iloc[offset: offset + limit]
    cols = {}
    for c in page.columns:
        s = page[c]
        if hasattr(s, "dt"):
            s = s.dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        cols[c] = _clean([v.item() if hasattr(v, "item") else v for v in s.tolist()])
    return {"total": len(frame), "offset": offset, "limit": limit, "rows": len(page), **cols}


# ----------------------------------------------------------------------------- hosting


class HostingBody(StrictScalars):
    """Snapshot hosting capacity at buses of a bundled feeder (DESIGN definition)."""

    model_config = ConfigDict(extra="forbid")

    feeder: Feeder
    kind: Literal["pv", "load"] = "pv"
    method: Literal["fast-groups", "fast", "linear", "brute-force"] = "fast-groups"
    buses: list[str] | None = Field(None, max_length=20_000,
                                    description="bus or bus.phases; None: every primary bus")
    max_kw: float = Field(10_000.0, gt=0, le=MAX_SIZE_KW, allow_inf_nan=False)
    v_deviation_pu: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Largest voltage change from the base case [pu]; None (default): not "
                    "checked (voltage band and thermal only).")
    reverse_flow: bool = False


def _hosting(body: HostingBody) -> dict[str, Any]:
    from derms.analysis.constraints import Limits
    from derms.analysis.hosting_brute import hosting_capacity_brute
    from derms.analysis.hosting_capacity import (
        HostingCriteria,
        hosting_capacity_fast,
        resolve_sites,
    )
    from derms.grid.bundled import resolve_master
    from derms.powerflow.control_state import freeze_base_case
    from derms.powerflow.engine import OpenDSSEngine

    crit = HostingCriteria(limits=Limits(reverse_power_kw=0.0 if body.reverse_flow else None),
                           v_deviation_pu=body.v_deviation_pu, reverse_flow=body.reverse_flow,
                           p_max_kw=body.max_kw)
    with OpenDSSEngine(resolve_master(body.feeder)) as eng:
        freeze_base_case(eng)
        sites = resolve_sites(eng, body.buses)
        if body.method == "brute-force":
            res = hosting_capacity_brute(eng, sites, body.kind, crit)
        else:
            verify = {"fast-groups": "groups", "fast": True, "linear": False}[body.method]
            res = hosting_capacity_fast(eng, sites, body.kind, crit, verify=verify)
    return {"runtime_s": res.runtime_s, "n_ac_solves": res.n_ac_solves,
            "sites": _columns(res.table, 0, len(res.table)),
            "pre_existing": _columns(res.pre_existing, 0, len(res.pre_existing))}


@router.post("/hosting-capacity")
async def post_hosting_capacity(request: Request, body: HostingBody,
                                principal: Annotated[Principal, Depends(require("read"))]
                                ) -> dict[str, Any]:
    """Hosting capacity per site: ``hc_kw`` (total over the site's phases, the device's own
    output or consumption, >= 0), the binding criterion and element."""
    return await _run(request, _hosting, body)


# ----------------------------------------------------------------------------- envelopes


class EnvelopeBody(StrictScalars):
    """Operating envelopes over a horizon from the bundled load shapes (a seeded draw)."""

    model_config = ConfigDict(extra="forbid")

    feeder: Feeder
    policy: Literal["equal", "proportional", "max_total"] = "equal"
    connection_points: int | list[str] | None = Field(
        None, description="None: every load; N: N loads drawn with the seed; or load names")
    start: datetime = Field(datetime(2026, 7, 1, tzinfo=UTC),
                            description="Horizon start (UTC if no zone).")
    hours: float = Field(24.0, gt=0, le=168, allow_inf_nan=False)
    step_min: int = Field(5, ge=1, le=60)
    direction: Literal["both", "export", "import"] = "both"
    voltage_range: Literal["A", "B"] = "A"
    capacity_kw: float = Field(20.0, gt=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("start")
    @classmethod
    def _start_year(cls, v: datetime) -> datetime:
        return _study_start(v)
    format: Literal["table", "site_controls"] = Field(
        "table", description="table: envelopes.csv columns [kW]; site_controls: one control "
                             "per connection point and interval [W] (CSIP-AUS opModExpLimW /"
                             " opModImpLimW values)")
    offset: int = Field(0, ge=0)
    limit: int = Field(10_000, ge=0, le=500_000)
    store: bool = Field(False, description="Also store the set in the database (its id in "
                                           "the answer as set_id; GET /v1/envelopes/sets)")


def _envelopes(body: EnvelopeBody) -> dict[str, Any]:
    import numpy as np

    from derms.analysis.constraints import Limits
    from derms.analysis.envelope_network import connection_points
    from derms.analysis.envelopes import EnvelopeCriteria, compute_envelopes
    from derms.grid.bundled import resolve_master
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine
    from derms.reports.envelopes_out import EnvelopeReport, summary
    from derms.studies.qsts_study import StudyConfig, study_profiles

    start = body.start if body.start.tzinfo else body.start.replace(tzinfo=UTC)
    cfg = StudyConfig(days=body.hours / 24, step=timedelta(minutes=body.step_min),
                      start=start.astimezone(UTC), seed=body.seed)
    dirs = ("export", "import") if body.direction == "both" else (body.direction,)
    limits = Limits.ansi_range_a() if body.voltage_range == "A" else Limits.ansi_range_b()
    with OpenDSSEngine(resolve_master(body.feeder)) as eng:
        eng.solve_snapshot()
        model = read_feeder(eng.ctx, eng.source_master)
        prof, _ = study_profiles(model, cfg)
        names = [ld.name for ld in model.loads if ld.enabled]
        pick = body.connection_points
        if isinstance(pick, int):
            if not 1 <= pick <= len(names):
                raise InfeasibleError(f"connection_points {pick}: the feeder has {len(names)} "
                                      "enabled loads")
            rng = np.random.default_rng(body.seed)
            pick = [names[i] for i in sorted(rng.choice(len(names), pick, replace=False))]
        cps = connection_points(model, pick, min_capacity_kw=body.capacity_kw)
        res = compute_envelopes(eng, prof, cps, EnvelopeCriteria(
            policy=body.policy, directions=dirs, limits=limits))
    frame = res.table() if body.format == "table" else res.site_controls()
    out = {"summary": _clean(summary(EnvelopeReport(model, res, body.feeder))),
           body.format: _columns(frame, body.offset, body.limit)}
    if body.store:
        out["_table"] = res.table()  # the whole set, stored by the API process
    return out


@router.post("/envelopes", response_model=None)
async def post_envelopes(request: Request, body: EnvelopeBody,
                         principal: Annotated[Principal, Depends(require("operate"))],
                         download: Download | None = None) -> dict[str, Any] | Response:
    """Export and import limits per connection point and interval that hold with every
    connection point at its envelope at once (AC-checked); the summary has the ratio to a
    static 5 kW limit and the largest AC excess. ``?download=csv|parquet``: the whole
    envelope set (``envelopes.csv`` columns, or the site controls) as a file."""
    if download is not None:
        body = body.model_copy(update={"offset": 0, "limit": 500_000})
    out = await _run(request, _envelopes, body)
    table = out.pop("_table", None)
    if table is not None:
        from starlette.concurrency import run_in_threadpool

        from derms.store.envelopes import save_envelope_set

        out["set_id"] = await run_in_threadpool(
            save_envelope_set, request.app.state.engine, feeder=body.feeder,
            policy=body.policy, table=table, summary=out["summary"])
    if download is not None:
        name = "envelopes" if body.format == "table" else "site_controls"
        return table_response(columns_frame(out[body.format]), download, name)
    return out


@router.get("/envelopes/sets")
def get_envelope_sets(request: Request,
                      principal: Annotated[Principal, Depends(require("read"))],
                      feeder: str | None = None, limit: int = Query(100, ge=1, le=1000),
                      offset: Offset = 0) -> dict[str, Any]:
    """Stored envelope sets, newest first (paginated)."""
    from derms.store.envelopes import list_envelope_sets

    total, items = list_envelope_sets(request.app.state.engine, feeder, limit, offset)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/envelopes/sets/{set_id}", response_model=None)
def get_envelope_set(request: Request, set_id: DbId,
                     principal: Annotated[Principal, Depends(require("read"))],
                     offset: Offset = 0, limit: int = Query(10_000, ge=0, le=500_000),
                     download: Download | None = None) -> dict[str, Any] | Response:
    """A stored set: its summary and a page of its values (``connection_point, timestamp,
    export_limit_kw, import_limit_kw``); ``?download=csv|parquet``: all values as a file."""
    from derms.store.envelopes import envelope_set

    found = envelope_set(request.app.state.engine, set_id)
    if found is None:
        raise Problem(404, f"envelope set {set_id} not found")
    info, values = found
    if download is not None:
        return table_response(values, download, f"envelopes_set_{set_id}")
    return {**_clean(info), "values": _columns(values, offset, limit)}


# ----------------------------------------------------------------------------- interconnect


class InterconnectBody(StrictScalars):
    """Static and flexible interconnection check of one new device at a bus."""

    model_config = ConfigDict(extra="forbid")

    feeder: Feeder
    bus: str = Field(min_length=1, max_length=200, description="bus or bus.phases")
    kind: Literal["pv", "load", "battery"] = "pv"
    kw: float = Field(gt=0, le=MAX_SIZE_KW, allow_inf_nan=False)
    start: datetime = Field(datetime(2026, 1, 1, 8, tzinfo=UTC))
    days: float = Field(365.0, gt=0, le=366, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    reference: bool = False

    @field_validator("start")
    @classmethod
    def _start_year(cls, v: datetime) -> datetime:
        return _study_start(v)


def _study_start(start: datetime) -> datetime:
    """A body's ``start``: a year :func:`derms.timeutil.check_study_start` accepts
    (ValueError -> 422)."""
    from derms.timeutil import check_study_start

    try:
        return check_study_start(start, "start")
    except DermsError as exc:
        raise ValueError(str(exc)) from None


def _interconnect(body: InterconnectBody) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from derms.analysis.hosting_capacity import resolve_sites
    from derms.analysis.interconnection import curtailment_reference, flexible_connection
    from derms.grid.bundled import resolve_master
    from derms.grid.opendss_import import read_feeder
    from derms.powerflow.engine import OpenDSSEngine
    from derms.reports.interconnect_out import write_interconnect_outputs
    from derms.studies.device_profiles import device_profile
    from derms.studies.qsts_study import StudyConfig, study_profiles

    start = (body.start if body.start.tzinfo else body.start.replace(tzinfo=UTC)).astimezone(UTC)
    cfg = StudyConfig(days=body.days, step=timedelta(hours=1), start=start, seed=body.seed)
    pu = device_profile(body.kind, start, cfg.n_steps, cfg.step, body.seed)
    results = {}
    fns = [("fast", flexible_connection)] + (
        [("reference", curtailment_reference)] if body.reference else [])
    for name, fn in fns:
        with OpenDSSEngine(resolve_master(body.feeder)) as eng:
            eng.solve_snapshot()
            model = read_feeder(eng.ctx, eng.source_master)
            site = resolve_sites(eng, [body.bus])[0]
            prof, _ = study_profiles(model, cfg)
            results[name] = fn(eng, prof, site, body.kind, body.kw, pu)
    with tempfile.TemporaryDirectory() as tmp:
        summ = write_interconnect_outputs(results, model.name, body.feeder, Path(tmp))
    return _clean(summ)


@router.post("/interconnect")
async def post_interconnect(request: Request, body: InterconnectBody,
                            principal: Annotated[Principal, Depends(require("read"))]
                            ) -> dict[str, Any]:
    """Can ``kw`` of PV, battery or EV charging connect at ``bus`` with a static limit, and
    how much would a flexible connection be curtailed over the horizon?"""
    return await _run(request, _interconnect, body)


async def _run(request: Request, func, body) -> dict[str, Any]:
    try:
        return await request.app.state.engine_pool.run(func, body)
    except DermsError as exc:  # unknown bus/load, impossible request: the caller's input
        raise Problem(422, str(exc), errors=[{"field": "body", "detail": str(exc)}]) from None
