"""Constraint forecasts over HTTP: predicted violations with their probability.

``POST /constraints/forecast`` takes a bundled feeder, a PV penetration and the load and
PV histories inline (timestamps with a zone), and answers the hourly probabilities and the
predicted violations (capped). The work runs in a worker thread.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field, model_validator

from derms.api.auth import Principal, require
from derms.api.json_body import StrictJsonRoute
from derms.api.problems import Problem
from derms.errors import DermsError, InputError
from derms.grid.bundled import resolve_master
from derms.strict import StrictScalars

router = APIRouter(tags=["constraints"], route_class=StrictJsonRoute)
MAX_VIOLATION_ROWS = 5000


class History(StrictScalars):
    """A measured series: ISO 8601 timestamps with a zone, and values (same length)."""

    model_config = ConfigDict(extra="forbid")
    timestamps: list[datetime] = Field(min_length=2)
    values: list[float | None]

    @model_validator(mode="after")
    def _check(self) -> History:
        if len(self.timestamps) != len(self.values):
            raise ValueError(f"{len(self.timestamps)} timestamps but {len(self.values)} values")
        naive = [i for i, t in enumerate(self.timestamps) if t.tzinfo is None]
        if naive:
            raise ValueError(f"timestamps[{naive[0]}] has no time zone")
        return self

    def series(self) -> pd.Series:
        idx = pd.DatetimeIndex(pd.to_datetime(self.timestamps, utc=True))
        return pd.Series([float("nan") if v is None else v for v in self.values],
                         index=idx, dtype=float).dropna()


class ConstraintForecastBody(StrictScalars):
    model_config = ConfigDict(extra="forbid")
    feeder: Literal["ieee13", "ieee123", "ieee8500"]
    load_history: History
    pv_history: History
    origin: datetime
    horizon_h: float = Field(24.0, gt=0, le=168)
    pv_penetration: float = Field(0.5, ge=0, le=1)
    pv_capacity: float | None = Field(None, gt=0)
    latitude: float | None = Field(None, ge=-90, le=90)
    longitude: float | None = Field(None, ge=-180, le=180)
    tz: str = "UTC"
    method: Literal["grid", "copula"] = "grid"
    threshold: float = Field(0.5, gt=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _aware(self) -> ConstraintForecastBody:
        if self.origin.tzinfo is None:
            raise ValueError("origin has no time zone")
        return self


def _run(body: ConstraintForecastBody) -> dict[str, Any]:
    from derms.studies.constraint_study import run_constraint_forecast

    fc, feeder, n_pv = run_constraint_forecast(
        resolve_master(body.feeder), body.load_history.series(), body.pv_history.series(),
        pv_penetration=body.pv_penetration, seed=body.seed,
        origin=pd.Timestamp(body.origin).tz_convert("UTC"),
        horizon=pd.Timedelta(hours=body.horizon_h), pv_capacity=body.pv_capacity,
        latitude=body.latitude, longitude=body.longitude, tz=body.tz, method=body.method,
        threshold=body.threshold)
    hourly = fc.hourly.copy()
    viol = fc.violations.head(MAX_VIOLATION_ROWS).copy()
    pre = fc.pre_existing.head(MAX_VIOLATION_ROWS).copy()
    for frame in (hourly, viol, pre):
        for col in frame.columns:
            if isinstance(frame[col].dtype, pd.DatetimeTZDtype):
                frame[col] = frame[col].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"feeder": feeder, "n_pv": n_pv, "threshold": fc.threshold,
            "n_scenarios": len(fc.scenarios), "runtime_s": fc.runtime_s,
            "notes": list(fc.notes),
            "predicted_hours": {k: [t.strftime("%Y-%m-%dT%H:%M:%SZ")
                                    for t in fc.predicted_hours(k)]
                                for k in ("overvoltage", "undervoltage", "thermal")},
            "hourly": hourly.to_dict(orient="records"),
            "violations": viol.to_dict(orient="records"),
            "violations_truncated": len(fc.violations) > MAX_VIOLATION_ROWS,
            "pre_existing": pre.to_dict(orient="records"),
            "pre_existing_truncated": len(fc.pre_existing) > MAX_VIOLATION_ROWS}


@router.post("/constraints/forecast")
async def post_constraint_forecast(
        request: Request, body: ConstraintForecastBody,
        principal: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    """Predicted violations over the horizon with their probability (read scope: it computes,
    it stores nothing).

    Histories too short or inconsistent → 422 problem+json with the reason.
    """
    try:
        return await request.app.state.engine_pool.run(_run, body)
    except InputError as exc:
        raise Problem(422, str(exc)) from None
    except DermsError as exc:
        raise Problem(422, f"the constraint forecast failed: {exc}") from None
