"""Dispatch planning on demand: ``POST /dispatch/plan`` (operate scope).

Thin: the body names a bundled feeder and a seeded scenario; the work is
:func:`derms.reports.dispatch_outputs.run_dispatch_study` (the same as ``derms dispatch``),
run in the threadpool. The answer is the study's summary, its DERs and the optimised
schedule as columns (``der_id, kind, timestamp, p_kw, q_kvar, soc_frac, curtail_kw``;
net import, consumption positive; timestamps UTC ISO 8601, interval starts), a page of
at most ``schedule_limit`` rows from ``schedule_offset``. No plan meeting the
constraints → 422 problem+json (type ``infeasible``) naming what binds.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ConfigDict, Field

from derms.api.auth import Principal, require
from derms.api.downloads import Download, columns_frame, table_response
from derms.api.json_body import StrictJsonRoute
from derms.api.problems import Problem
from derms.dispatch import EXPORT_LIMIT_MAX_KW
from derms.errors import InfeasibleError, InputError
from derms.strict import StrictScalars

router = APIRouter(tags=["dispatch"], route_class=StrictJsonRoute)

Share = Annotated[float, Field(ge=0.0, le=1.0)]


class PlanBody(StrictScalars):
    """A dispatch study request. Penetrations are shares of the feeder's customers."""

    model_config = ConfigDict(extra="forbid")

    feeder: Literal["ieee13", "ieee123", "ieee8500"] = Field(
        description="Bundled feeder name.")
    pv_penetration: Share = 0.3
    battery_penetration: Share = 0.25
    ev_penetration: Share = 0.2
    seed: int = Field(1, ge=0, le=2**31 - 1)
    horizon: str = Field("24h", description="Planning horizon, e.g. 24h (whole steps).")
    step: str = Field("15min", description="Interval length, e.g. 15min or 1h.")
    policy: Literal["cost_minimal", "equal_proportional", "proportional_to_capacity"] = \
        "cost_minimal"
    export_limit_kw: float | None = Field(
        None, allow_inf_nan=False, gt=-EXPORT_LIMIT_MAX_KW, lt=EXPORT_LIMIT_MAX_KW,
        description="Largest substation export [kW]: head import >= -X (a negative X asks "
                    "for a minimum import). None: no limit.")
    forecast: Literal["noisy", "model", "perfect"] = "perfect"
    replan_every: str | None = Field(
        None, description="Re-plan period of the rolling run (forecast noisy / model), a "
                          "whole number of steps; default 15 min (or one step if longer).")
    group_size: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] = Field("auto", description=(
        "Plan DERs in groups of about this many (compatible DERs near each other moving "
        "in fixed proportion), 1 to 1000; 1: every DER on its own; \"auto\": groups of 4 "
        "from 500 DERs, else 1 (summary.group_size says which)."))
    realtime: bool = Field(True, description=(
        "The rolling run (forecast noisy / model) executes each interval on the AC model "
        "and corrects the ones that break a limit; false: as planned."))
    schedule_offset: int = Field(0, ge=0)
    schedule_limit: int = Field(5000, ge=0, le=100_000)


_FIELDS = {"horizon": "horizon", "step": "step", "replan_every": "replan_every"}


def _clean(values: list) -> list:
    """NaN -> None (JSON)."""
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def _plan(body: PlanBody) -> dict[str, Any]:
    from derms.dispatch.plan import ObjectiveConfig
    from derms.reports.dispatch_outputs import (
        ders_table,
        parse_horizon,
        parse_replan,
        replace_nan,
        run_dispatch_study,
        schedule_table,
    )
    from derms.studies.dispatch_scenario import ScenarioConfig

    step, n_steps = parse_horizon(body.horizon, body.step, names=_FIELDS)
    replan = parse_replan(body.replan_every, step, name="replan_every")
    cfg = ScenarioConfig(pv_penetration=body.pv_penetration,
                         battery_penetration=body.battery_penetration,
                         ev_penetration=body.ev_penetration, seed=body.seed, step=step,
                         n_steps=n_steps)
    objective = ObjectiveConfig(export_limit_kw=body.export_limit_kw,
                                curtailment_policy=body.policy)
    study = run_dispatch_study(body.feeder, cfg, objective, forecast=body.forecast,
                               replan_every=replan,
                               group_size=None if body.group_size == "auto"
                               else body.group_size,
                               realtime=body.realtime)
    sched = schedule_table(study.optimised.schedule)
    page = sched.iloc[body.schedule_offset: body.schedule_offset + body.schedule_limit]
    ders = ders_table(study.scenario)
    return {
        "summary": replace_nan(study.summary),
        "ders": [replace_nan(r) for r in ders.to_dict(orient="records")],
        "ev_shortfalls": [replace_nan(r) for r in
                          study.ledger.ev_shortfalls.to_dict(orient="records")],
        "schedule": {"total": len(sched), "offset": body.schedule_offset,
                     "limit": body.schedule_limit, "rows": len(page),
                     **{c: _clean(page[c].tolist()) for c in page.columns}},
    }


@router.post("/dispatch/plan", response_model=None)
async def post_dispatch_plan(request: Request, body: PlanBody,
                             principal: Annotated[Principal, Depends(require("operate"))],
                             download: Download | None = None) -> dict[str, Any] | Response:
    """Plan a seeded dispatch scenario on a bundled feeder and verify it on the AC model:
    the summary (peaks [kW], violation counts, timings [s]), the DERs, the EV sessions a
    network limit leaves short of their energy (with that limit) and a page of the
    optimised schedule; ``?download=csv|parquet``: the whole optimised schedule as a file
    (``schedule.csv`` columns of docs/data-formats.md)."""
    if download is not None:
        body = body.model_copy(update={"schedule_offset": 0, "schedule_limit": 100_000})
    try:
        out = await request.app.state.engine_pool.run(_plan, body)
        if download is not None:
            return table_response(columns_frame(out["schedule"]), download, "schedule")
        return out
    except InfeasibleError as exc:
        raise Problem(422, str(exc), type_="infeasible") from None
    except InputError as exc:
        field = f"body.{exc.field}" if exc.field else "body"
        raise Problem(422, str(exc), errors=[{"field": field, "detail": str(exc)}]) from None
