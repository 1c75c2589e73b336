"""Forecasts: the latest run of a series, runs in a time range, trained models; retrain and
issue on demand (operate scope). Thin: the work is :class:`derms.monitoring.forecasting.
ForecastService` (``app.state.forecasts``, built on first use if the app has none).

A series is addressed like ``GET /v1/readings``: ``series`` (device or meter id),
``quantity`` (``p_kw``) and, when it has several, the reading ``source``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Depends, Request, Response
from pydantic import ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from derms.api.auth import Principal, require
from derms.api.downloads import Download, table_response
from derms.api.json_body import StrictJsonRoute
from derms.api.paging import Limit, Offset
from derms.api.problems import Problem
from derms.errors import InputError
from derms.forecast.forecaster import ForecastSpec
from derms.monitoring.forecasting import ForecastService, ForecastTarget, UnknownModelError
from derms.store.forecasts import (
    UnknownSeriesError,
    find_series,
    latest_forecast,
    list_models,
    list_runs,
    run_values,
)
from derms.strict import StrictScalars

router = APIRouter(tags=["forecasts"], route_class=StrictJsonRoute)

_SPEC_FIELDS = {"kind": "kind", "horizon": "horizon_s", "quantiles": "quantiles",
                "location": "latitude", "holidays": "holidays", "step_s": "step_s",
                "horizon_s": "horizon_s", "name": "name", "origin": "origin",
                "targets": "targets", "target": "targets"}


def _service(request: Request) -> ForecastService:
    svc = getattr(request.app.state, "forecasts", None)
    if svc is None:
        svc = ForecastService(request.app.state.settings, request.app.state.engine)
        request.app.state.forecasts = svc
    return svc


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise Problem(422, f"{name} {value.isoformat()} has no time zone",
                      errors=[{"field": f"query.{name}", "detail": "needs a time zone"}])
    return value


def _input_problem(exc: InputError, where: str = "body") -> Problem:
    """422 naming the field the core's message starts with (``kind 'x': …``)."""
    if isinstance(exc, (UnknownSeriesError, UnknownModelError)):
        return Problem(404, str(exc))
    first = str(exc).split(" ", 1)[0].strip(":'\"")
    field = _SPEC_FIELDS.get(first)
    if field is None:
        field = "targets" if any(w in str(exc) for w in ("series", "history")) else None
    errors = [{"field": f"{where}.{field}", "detail": str(exc)}] if field else []
    return Problem(422, str(exc), errors=errors)


def _series(request: Request, series: str, quantity: str, source: str | None) -> int:
    try:
        return find_series(request.app.state.engine, series, quantity, source).series_id
    except UnknownSeriesError as exc:
        raise Problem(404, str(exc)) from None
    except InputError as exc:  # several reading sources: name one
        raise Problem(422, str(exc), errors=[{"field": "query.source", "detail": str(exc)}]
                      ) from None


@router.get("/forecasts/latest", response_model=None)
def get_latest_forecast(request: Request,
                        principal: Annotated[Principal, Depends(require("read"))],
                        series: str, quantity: str, source: str | None = None,
                        at: datetime | None = None, download: Download | None = None
                        ) -> dict[str, Any] | Response:
    """The latest forecast of a series (issued at or before ``at`` if given): the run and its
    values as columns ``t`` (interval starts, ISO 8601 UTC), ``p10``, ``p50``, ``p90`` in the
    series' unit; ``?download=csv|parquet``: the values as a file."""
    at = _aware(at, "at")
    sid = _series(request, series, quantity, source)
    found = latest_forecast(request.app.state.engine, sid, at)
    if found is None:
        raise Problem(404, f"series {series!r} quantity {quantity!r}: no forecast issued"
                           + (f" at or before {at.isoformat()}" if at else ""))
    if download is not None:
        return table_response(found.values[["t", "p10", "p50", "p90"]], download,
                              f"forecast_run_{found.run.id}")
    return {"series": series, "quantity": quantity, **found.to_dict()}


@router.get("/forecasts/runs")
def get_forecast_runs(request: Request,
                      principal: Annotated[Principal, Depends(require("read"))],
                      series: str, quantity: str, source: str | None = None,
                      since: datetime | None = None, until: datetime | None = None,
                      values: bool = False, limit: Limit = 100, offset: Offset = 0
                      ) -> dict[str, Any]:
    """Runs of a series issued in ``[since, until)``, newest first, paginated; with
    ``values=true`` each item carries its values as columns."""
    since, until = _aware(since, "since"), _aware(until, "until")
    if since is not None and until is not None and until <= since:
        raise Problem(422, "until must be after since",
                      errors=[{"field": "query.until", "detail": "must be after since"}])
    engine = request.app.state.engine
    sid = _series(request, series, quantity, source)
    total, runs = list_runs(engine, sid, since, until, limit, offset)
    items = [r.to_dict() for r in runs]
    if values and runs:
        frame = run_values(engine, [r.id for r in runs])
        for item, (_, part) in zip(items, _by_run(frame, [r.id for r in runs])):
            item["t"] = [t.isoformat() for t in part["t"]]
            for c in ("p10", "p50", "p90"):
                item[c] = part[c].astype(float).tolist()
    return {"series": series, "quantity": quantity, "total": total, "limit": limit,
            "offset": offset, "items": items}


def _by_run(frame: pd.DataFrame, ids: list[int]):
    groups = dict(tuple(frame.groupby("run_id", sort=False)))
    empty = frame.iloc[0:0]
    return [(i, groups.get(i, empty)) for i in ids]


@router.get("/forecasts/models")
def get_forecast_models(request: Request,
                        principal: Annotated[Principal, Depends(require("read"))],
                        name: str | None = None, limit: Limit = 100, offset: Offset = 0
                        ) -> dict[str, Any]:
    """Trained forecast models, most recently trained first (``name`` to filter)."""
    total, models = list_models(request.app.state.engine, name, limit, offset)
    return {"total": total, "limit": limit, "offset": offset,
            "items": [m.to_dict() for m in models]}


class RetrainBody(StrictScalars):
    """A retrain request: model name, target series and the forecast spec."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    targets: list[str] = Field(min_length=1, max_length=10_000,
                               description="owner:quantity:kind[:source]")
    kind: Literal["load", "pv"] = "load"
    step_s: int = Field(default=900, gt=0, le=86_400)
    horizon_s: int = Field(default=86_400, gt=0, le=7 * 86_400)
    tz: str = "UTC"
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)
    holidays: str | None = None
    n_rounds: int = Field(default=200, ge=1, le=5000)
    seed: int = 7
    history_days: int | None = Field(default=None, gt=0, le=3660)
    train_end: datetime | None = None

    @field_validator("tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


class IssueBody(StrictScalars):
    """An issue request: model name, optional origin (default now, floored to the step) and
    targets (default the model's)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    origin: datetime | None = None
    targets: list[str] | None = Field(default=None, min_length=1, max_length=10_000)


def _body_time(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise Problem(422, f"{name} {value.isoformat()} has no time zone",
                      errors=[{"field": f"body.{name}", "detail": "needs a time zone"}])
    return value


def _parse_targets(texts: list[str]) -> list[ForecastTarget]:
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(ForecastTarget.parse(text))
        except InputError as exc:
            raise Problem(422, str(exc), errors=[{"field": f"body.targets.{i}",
                                                  "detail": str(exc)}]) from None
    return out


@router.post("/forecasts/retrain")
async def post_retrain(request: Request, body: RetrainBody,
                       principal: Annotated[Principal, Depends(require("operate"))]
                       ) -> dict[str, Any]:
    """Train a model now on the targets' history (synchronously, in a worker thread).

    Answers the model record and ``created`` (false when the same data gave the same
    version). Unknown series → 404; too-short history or a bad spec → 422.
    """
    train_end = _body_time(body.train_end, "train_end")
    targets = _parse_targets(body.targets)
    try:
        spec = ForecastSpec(kind=body.kind, horizon=pd.Timedelta(seconds=body.horizon_s),
                            tz=body.tz, latitude=body.latitude, longitude=body.longitude,
                            holidays=body.holidays, n_rounds=body.n_rounds, seed=body.seed)
    except InputError as exc:
        raise _input_problem(exc) from None
    svc = _service(request)
    try:
        result = await run_in_threadpool(svc.retrain, body.name, targets, spec,
                                         step=timedelta(seconds=body.step_s),
                                         train_end=train_end, history_days=body.history_days)
    except InputError as exc:
        raise _input_problem(exc) from None
    return result.to_dict()


@router.post("/forecasts/issue")
async def post_issue(request: Request, body: IssueBody,
                     principal: Annotated[Principal, Depends(require("operate"))]
                     ) -> dict[str, Any]:
    """Forecast with the latest model of ``name`` (no refit) and store one run per series;
    answers the run ids. Unknown model or series → 404."""
    origin = _body_time(body.origin, "origin")
    targets = _parse_targets(body.targets) if body.targets is not None else None
    svc = _service(request)
    try:
        result = await run_in_threadpool(svc.issue, body.name, origin, targets)
    except InputError as exc:
        raise _input_problem(exc) from None
    return result.to_dict()
