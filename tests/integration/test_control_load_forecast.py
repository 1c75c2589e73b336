"""The control loop's load forecast (real SQLite store, migrations applied): the stored head
forecast is corrected by the error it made over the last hour; without enough history or
without a forecast of the last hour it is left as stored, and the info says why."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from derms.control.load_forecast import head_load_multiplier
from derms.monitoring.feeder_monitor import head_meter_id
from derms.store.db import make_engine, make_session_factory
from derms.store.forecasts import RunIn, find_series, save_model_record, write_forecast
from derms.store.migrate import upgrade
from derms.store.models import Feeder, Meter, Phase
from derms.store.timeseries import write_readings

NOW = datetime(2026, 7, 10, 14, 5, tzinfo=UTC)
STEP = pd.Timedelta(minutes=15)
BASE_KW = 1000.0


def _load_kw(t: pd.DatetimeIndex, hot: float) -> np.ndarray:
    """A daily shape; ``hot`` scales the day of NOW (1.15: 15 % above the days before)."""
    h = (t.hour + t.minute / 60).to_numpy()
    shape = 800 + 300 * np.sin(2 * np.pi * (h - 8) / 24)
    return shape * np.where(t.normalize() == pd.Timestamp(NOW).normalize(), hot, 1.0)


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    upgrade(url)
    engine = make_engine(url)
    fid = f"f-{uuid.uuid4().hex[:6]}"
    with make_session_factory(engine).begin() as s:
        s.add(Feeder(feeder_id=fid, name="test"))
        s.flush()
        s.add(Meter(meter_id=head_meter_id(fid), feeder_id=fid, bus="150", phase=Phase.ABC))
    yield engine, fid
    engine.dispose()


def _readings(engine, fid, days: float) -> None:
    end = pd.Timestamp(NOW).floor(STEP)
    t = pd.date_range(end - pd.Timedelta(days=days), end, freq=STEP, inclusive="left")
    write_readings(engine, pd.DataFrame({
        "meter_id": head_meter_id(fid), "quantity": "p_kw", "value": _load_kw(t, 1.15),
        "t": pd.Series(list(t.to_pydatetime()), dtype=object), "source": "scada"}))


def _forecast(engine, fid, issued: datetime, hours: float) -> None:
    """A day-ahead-style forecast: yesterday's shape (15 % low on the hot day)."""
    sid = find_series(engine, head_meter_id(fid), "p_kw").series_id
    model, _ = save_model_record(engine, name="load", kind="load", version="v1",
                                 trained_at=issued, train_end=issued, n_series=1, path="x")
    t = pd.date_range(pd.Timestamp(issued).floor(STEP), periods=int(hours * 4), freq=STEP)
    p50 = _load_kw(t, 1.0)
    write_forecast(engine, RunIn(sid, model.id, issued, int(hours * 3600), 900),
                   pd.DataFrame({"t": t, "p10": 0.9 * p50, "p50": p50, "p90": 1.1 * p50}))


def test_the_error_of_the_last_hour_corrects_the_next_hours(db):
    engine, fid = db
    _readings(engine, fid, days=10)
    _forecast(engine, fid, NOW - timedelta(hours=3), hours=12)
    mult, info = head_load_multiplier(engine, fid, BASE_KW, lambda t: 0.5, NOW)
    assert info["source"] == "forecast" and info["feedback"]["applied"], info
    assert info["feedback"]["n_recent"] == 4 and info["feedback"]["error_kw"] > 100.0
    nxt = pd.date_range(pd.Timestamp(NOW).ceil(STEP), periods=8, freq=STEP)
    truth = _load_kw(nxt, 1.15)
    raw = _load_kw(nxt, 1.0)
    got = np.array([mult(t) for t in nxt.to_pydatetime()]) * BASE_KW
    assert np.abs(got - truth).mean() < 0.5 * np.abs(raw - truth).mean(), (got, truth, raw)
    # intervals already past keep the stored values
    past = (pd.Timestamp(NOW) - timedelta(hours=2)).floor(STEP).to_pydatetime()
    assert mult(past) * BASE_KW == pytest.approx(_load_kw(pd.DatetimeIndex([past]), 1.0)[0])


def test_without_history_or_a_forecast_of_the_last_hour_the_forecast_is_kept(db):
    engine, fid = db
    _readings(engine, fid, days=1)                        # under two days of history
    _forecast(engine, fid, NOW - timedelta(minutes=3), hours=6)
    mult, info = head_load_multiplier(engine, fid, BASE_KW, lambda t: 0.5, NOW)
    assert info["feedback"]["applied"] is False and "two days" in info["feedback"]["reason"]
    _readings(engine, fid, days=10)
    mult, info = head_load_multiplier(engine, fid, BASE_KW, lambda t: 0.5, NOW)
    # the only run was issued 3 minutes ago: nothing forecast the last hour
    assert info["feedback"] == {"applied": False, "reason": "no forecast of the last hour"}
    t = pd.Timestamp(NOW).ceil(STEP)
    assert mult(t.to_pydatetime()) * BASE_KW == pytest.approx(
        _load_kw(pd.DatetimeIndex([t]), 1.0)[0])
