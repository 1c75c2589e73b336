"""The control loop's load forecast for a re-plan: the stored head forecast, corrected by
the error it has been making over the last hour.

:func:`head_load_multiplier` reads the forecast service's latest run (issued at or before
``now``) of the head meter's ``p_kw`` series (``<feeder>-head:p_kw:load``) and returns a
load multiplier: its P50 over the sum of the model's base load kW, per forecast interval;
outside the run's intervals the monitor's multiplier. Approximate: the head import also
holds losses and the DERs' net output of the forecast's history.

Intraday error feedback (:class:`derms.forecast.feedback.ErrorFeedback`): the stored
forecasts' P50 for the last hour (per interval, the latest issued before that interval)
against the head meter's readings; the mean error is carried into the intervals from
``now`` on with weights fitted on the last 14 days of head readings: per position of
``now`` in the day, the regression of the day-over-day change at each lead on its mean
over the last hour. Left out (with the reason in the info) with under two days of head
readings or no forecast of the last hour.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from derms.errors import InputError
from derms.forecast.feedback import ErrorFeedback
from derms.monitoring.feeder_monitor import head_meter_id
from derms.store.forecasts import forecast_range, latest_forecast
from derms.store.models import Series
from derms.store.timeseries import read_readings

_HISTORY = pd.Timedelta(days=14)
_RECENT = pd.Timedelta(hours=1)


def head_load_multiplier(db: Engine, feeder_id: str, base_kw: float,
                         fallback: Callable[[datetime], float], now: datetime
                         ) -> tuple[Callable[[datetime], float] | None, dict[str, Any]]:
    """(multiplier of time, info) from the stored head forecast (module docstring);
    (None, info) without such a run or without base load."""
    with db.connect() as conn:
        sid = conn.execute(select(Series.series_id).where(
            Series.meter_id == head_meter_id(feeder_id),
            Series.quantity == "p_kw")).scalars().first()
    fc = None if sid is None else latest_forecast(db, int(sid), at=now)
    if fc is None or fc.values.empty or base_kw <= 0:
        return None, {"source": "monitor load_multiplier"}
    t = pd.DatetimeIndex(fc.values["t"])
    t = t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")
    step = pd.Timedelta(seconds=fc.run.step_s)
    p50, fb_info = with_feedback(db, feeder_id, int(sid), t,
                                 fc.values["p50"].to_numpy(dtype=float), step, now)

    def mult(ts: datetime) -> float:
        k = int(t.searchsorted(pd.Timestamp(ts), side="right")) - 1
        if k >= 0 and pd.Timestamp(ts) < t[k] + step and np.isfinite(p50[k]):
            return max(float(p50[k]), 0.0) / base_kw
        return fallback(ts)

    return mult, {"source": "forecast", "run_id": fc.run.id,
                  "issued_at": fc.run.issued_at.isoformat(),
                  "model": f"{fc.run.model_name}:{fc.run.model_version}",
                  "base_load_kw": round(base_kw, 3), "feedback": fb_info}


def with_feedback(db: Engine, feeder_id: str, series_id: int, t: pd.DatetimeIndex,
                  p50_kw: np.ndarray, step: pd.Timedelta, now: datetime
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """``p50_kw`` (at interval starts ``t``) with the intervals not yet ended corrected by
    the last hour's error (module docstring), and an info dict saying what was done."""
    end = pd.Timestamp(now).floor(step)               # intervals that have ended by now
    hist = read_readings(db, quantity="p_kw", meter_id=head_meter_id(feeder_id),
                         start=end - _HISTORY, end=end, bucket=step)
    if hist.empty:
        return p50_kw, {"applied": False, "reason": "no head readings"}
    actual = hist.groupby("t")["value"].mean()
    grid = pd.date_range(end - _HISTORY, end, freq=step, inclusive="left")
    y = actual.reindex(grid).to_numpy(dtype=float)
    first = int(np.argmax(np.isfinite(y)))
    lead0 = int(np.searchsorted(t, end))              # first interval not yet ended
    try:
        n_day = int(pd.Timedelta(days=1) / step)
        fb = ErrorFeedback.fit(y[first:], n_day, max(len(t) - lead0, 1),
                               by_phase_recent=max(int(_RECENT / step), 1))
    except InputError as err:
        return p50_kw, {"applied": False, "reason": str(err)}
    past = forecast_range(db, series_id, end - _RECENT, end, issued_until=now)
    past = past[past["issued_at"] <= past["t"]].groupby("t")["p50"].last()
    both = pd.concat([actual.rename("a"), past.rename("f")], axis=1, join="inner").dropna()
    if both.empty:
        return p50_kw, {"applied": False, "reason": "no forecast of the last hour"}
    out = np.asarray(p50_kw, dtype=float).copy()
    out[lead0:] = fb.adjust(out[lead0:], both["a"].to_numpy(), both["f"].to_numpy(),
                            phase=(len(y) - first) % n_day)   # the origin `end`, from y[first]
    return out, {"applied": True, "n_recent": len(both),
                 "error_kw": round(float((both["a"] - both["f"]).mean()), 3)}
