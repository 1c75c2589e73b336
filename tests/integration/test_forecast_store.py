"""Forecasts in the historian, on SQLite and the real PostgreSQL: bulk write and read-back of
runs, retrain (versioned by content hash) and issue through ForecastService, the schedule
thread, and the 0003 migration down and up."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import inspect

from derms.config import get_settings
from derms.errors import InputError
from derms.forecast import ForecastSpec
from derms.monitoring.forecast_schedule import ForecastSchedule
from derms.monitoring.forecasting import (
    ForecastService,
    ForecastTarget,
    UnknownModelError,
)
from derms.store.db import make_engine, make_session_factory
from derms.store.forecasts import (
    RunIn,
    UnknownSeriesError,
    delete_runs,
    find_series,
    forecast_range,
    latest_forecast,
    latest_model,
    list_models,
    list_runs,
    run_values,
    save_model_record,
    write_forecast,
)
from derms.store.migrate import current_revision, downgrade, upgrade
from derms.store.models import Meter
from derms.store.timeseries import write_readings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 40
END = T0 + timedelta(days=DAYS)          # first hour without readings
HOUR = timedelta(hours=1)
SPEC = ForecastSpec(kind="load", n_rounds=20)


def synthetic_load(n_hours: int, scale_kw: float, seed: int, start: datetime = T0) -> pd.DataFrame:
    """Hourly load (import positive, kW): daily shape, weekend bump, noise."""
    t = pd.date_range(start, periods=n_hours, freq="h")
    h = t.hour.to_numpy()
    rng = np.random.default_rng(seed)
    v = scale_kw * (1 + 0.5 * np.sin(2 * np.pi * (h - 6) / 24)) \
        + 0.3 * (t.day_of_week.to_numpy() >= 5) + rng.normal(0, 0.1 * scale_kw, len(t))
    return pd.DataFrame({"t": t, "value": v})


def add_meters(engine, ids: list[str]) -> None:
    with make_session_factory(engine).begin() as s:
        s.add_all([Meter(meter_id=m) for m in ids])


def write_history(engine, meters: list[str], n_hours: int = DAYS * 24,
                  start: datetime = T0) -> None:
    """Readings through the store's bulk writer (source "ami", quantity p_kw)."""
    frames = []
    for i, m in enumerate(meters):
        f = synthetic_load(n_hours, 3.0 + i, seed=i, start=start)
        frames.append(f.assign(quantity="p_kw", meter_id=m, source="ami"))
    res = write_readings(engine, pd.concat(frames, ignore_index=True))
    assert res.inserted == n_hours * len(meters)


@pytest.fixture(scope="module")
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def meters(engine):
    """Two meters with 40 days of hourly load each."""
    uid = uuid.uuid4().hex[:6]
    ids = [f"m1-{uid}", f"m2-{uid}"]
    add_meters(engine, ids)
    write_history(engine, ids)
    return ids


@pytest.fixture
def service(engine, db_url, tmp_path):
    settings = get_settings(database_url=db_url, data_dir=tmp_path / "data")
    return ForecastService(settings, engine, clock=lambda: END + timedelta(minutes=17))


def targets(meters):
    return [f"{m}:p_kw:load" for m in meters]


def test_write_and_read_runs(engine):
    """Bulk write of runs, latest (optionally as of a time), listing and range reads."""
    uid = uuid.uuid4().hex[:6]
    add_meters(engine, [f"w-{uid}"])
    write_history(engine, [f"w-{uid}"], n_hours=3)
    sid = find_series(engine, f"w-{uid}", "p_kw").series_id
    model, created = save_model_record(engine, name=f"store-{uid}", kind="load", version="v1",
                                       trained_at=END, train_end=END, n_series=1, path="/x")
    again, created_again = save_model_record(engine, name=f"store-{uid}", kind="load",
                                             version="v1", trained_at=END + HOUR, train_end=END,
                                             n_series=1, path="/x")
    assert created and not created_again and again.id == model.id
    assert again.trained_at == END + HOUR
    t = pd.date_range(END, periods=24, freq="h")
    base = np.arange(24.0)
    ids = []
    for k, issued in enumerate([END, END + 6 * HOUR]):
        values = pd.DataFrame({"t": t + (issued - END), "p10": base + k - 1,
                               "p50": base + k, "p90": base + k + 1})
        ids.append(write_forecast(engine, RunIn(sid, model.id, issued, 86_400, 3600), values))
    latest = latest_forecast(engine, sid)
    assert latest.run.id == ids[1] and latest.run.issued_at == END + 6 * HOUR
    assert latest.run.issued_at.tzinfo is not None and latest.run.model_name == f"store-{uid}"
    assert len(latest.values) == 24 and latest.values["t"].iloc[0] == pd.Timestamp(END + 6 * HOUR)
    assert str(latest.values["t"].dt.tz) == "UTC"
    np.testing.assert_allclose(latest.values["p50"], base + 1)
    earlier = latest_forecast(engine, sid, at=END + HOUR)
    assert earlier.run.id == ids[0]
    assert latest_forecast(engine, sid, at=END - HOUR) is None
    total, runs = list_runs(engine, sid, since=END, until=END + 7 * HOUR, limit=1)
    assert total == 2 and [r.id for r in runs] == [ids[1]]
    rng = forecast_range(engine, sid, END + 6 * HOUR, END + 8 * HOUR)
    assert list(rng["run_id"]) == [ids[0], ids[0], ids[1], ids[1]]
    assert set(rng.columns) == {"run_id", "issued_at", "t", "p10", "p50", "p90"}
    with pytest.raises(InputError, match="naive"):
        write_forecast(engine, RunIn(sid, model.id, datetime(2026, 2, 1), 3600, 3600),
                       pd.DataFrame({"t": t[:1], "p10": [0.0], "p50": [0.0], "p90": [0.0]}))
    assert delete_runs(engine, run_ids=[ids[1]]) == 1
    assert latest_forecast(engine, sid).run.id == ids[0]
    assert run_values(engine, [ids[1]]).empty and len(run_values(engine, [ids[0]])) == 24


def test_retrain_issue_and_read_back(engine, meters, service):
    name = f"load-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    res = service.retrain(name, targets(meters), SPEC, step=HOUR)
    retrain_s = time.perf_counter() - t0
    assert res.created and res.n_series == 2 and res.model.kind == "load"
    assert res.model.train_end == END and res.model.path.endswith(res.model.version)
    assert (service.models_dir / name / res.model.version / "model.json").exists()
    t0 = time.perf_counter()
    issued = service.issue(name)                     # origin: the clock floored to the step
    issue_s = time.perf_counter() - t0
    print(f"\n[{engine.dialect.name}] retrain {retrain_s:.2f} s, issue {issue_s:.2f} s "
          "(2 series x 40 days hourly, n_rounds=20)")
    assert issued.origin == END and len(issued.runs) == 2 and not issued.failed
    for m in meters:
        fc = latest_forecast(engine, find_series(engine, m, "p_kw").series_id)
        v = fc.values
        assert fc.run.issued_at == END and fc.run.model_id == res.model.id
        assert fc.run.horizon_s == 86_400 and fc.run.step_s == 3600
        assert list(v["t"]) == list(pd.date_range(END, periods=24, freq="h"))
        assert (v["p10"] <= v["p50"]).all() and (v["p50"] <= v["p90"]).all()
        assert 0.5 < v["p50"].mean() < 10     # the synthetic loads average 3 and 4 kW
    # a later origin: the model is not refitted, a new run becomes the latest
    later = service.issue(name, origin=END + 3 * HOUR)
    assert later.model.version == res.model.version
    sid = find_series(engine, meters[0], "p_kw").series_id
    assert latest_forecast(engine, sid).run.issued_at == END + 3 * HOUR
    with pytest.raises(InputError, match="grid"):
        service.issue(name, origin=END + timedelta(minutes=30))


def test_same_data_and_seed_same_version(engine, meters, service):
    name = f"ver-{uuid.uuid4().hex[:6]}"
    first = service.retrain(name, targets(meters), SPEC, step=HOUR)
    again = service.retrain(name, targets(meters), SPEC, step=HOUR)
    assert not again.created and again.model.version == first.model.version
    assert again.model.id == first.model.id
    assert list_models(engine, name)[0] == 1
    other = service.retrain(name, targets(meters), ForecastSpec(kind="load", n_rounds=21),
                            step=HOUR)
    assert other.created and other.model.version != first.model.version
    assert latest_model(engine, name).id == other.model.id
    assert list_models(engine, name)[0] == 2


def test_errors_name_what_is_wrong(engine, meters, service):
    uid = uuid.uuid4().hex[:6]
    short = f"short-{uid}"
    add_meters(engine, [short])
    write_history(engine, [short], n_hours=5 * 24, start=END - timedelta(days=5))
    with pytest.raises(InputError, match=f"{short}.*training needs"):
        service.retrain(f"s-{uid}", [f"{short}:p_kw:load"], SPEC, step=HOUR)
    # a short series among long ones is left out with a warning, the model still trains
    res = service.retrain(f"mix-{uid}", [*targets(meters), f"{short}:p_kw:load"], SPEC, step=HOUR)
    assert res.n_series == 2 and any(short in w for w in res.warnings)
    # ... and the global model still forecasts it (it has readings in the last 8 days)
    out = service.issue(f"mix-{uid}")
    assert len(out.runs) == 3 and not out.failed
    with pytest.raises(UnknownSeriesError):
        service.retrain(f"u-{uid}", [f"nosuch-{uid}:p_kw:load"], SPEC, step=HOUR)
    with pytest.raises(UnknownModelError):
        service.issue(f"never-trained-{uid}")
    with pytest.raises(InputError, match="kind"):
        service.retrain(f"k-{uid}", [f"{meters[0]}:p_kw:pv"], SPEC, step=HOUR)
    with pytest.raises(InputError, match="step_s"):
        service.retrain(f"h-{uid}", targets(meters), SPEC, step=timedelta(hours=5))
    with pytest.raises(InputError, match="horizon_s"):
        service.retrain(f"h-{uid}", targets(meters),
                        ForecastSpec(kind="load", horizon=pd.Timedelta(minutes=90)), step=HOUR)
    with pytest.raises(InputError, match="name"):
        service.retrain("../escape", targets(meters), SPEC, step=HOUR)
    with pytest.raises(InputError, match="owner:quantity:kind"):
        ForecastTarget.parse("just-a-meter")


def test_schedule_issues_and_stops(engine, meters, service):
    prefix = f"sched-{uuid.uuid4().hex[:6]}"
    service.clock = lambda: END + timedelta(hours=12, minutes=5)  # later than other tests' runs
    sched = ForecastSchedule(service, targets(meters), issue_period_s=0.2, retrain_period_s=0,
                             specs={"load": SPEC}, step=HOUR, prefix=prefix)
    sched.start()
    try:
        assert sched.wait_for(issues=1, timeout=20), sched.last_error
    finally:
        sched.stop(timeout=20)
    assert sched._thread is None and sched.errors == 0
    assert sched.retrains == 1            # the missing model was trained before the first issue
    assert latest_model(engine, f"{prefix}-load") is not None
    sid = find_series(engine, meters[1], "p_kw").series_id
    run = latest_forecast(engine, sid).run
    assert run.model_name == f"{prefix}-load" and run.issued_at == END + timedelta(hours=12)
    assert sched.issues == 1              # later cycles saw the same origin: not re-issued


def test_schedule_survives_failing_cycles(engine, service):
    uid = uuid.uuid4().hex[:6]
    sched = ForecastSchedule(service, [f"nosuch-{uid}:p_kw:load"], issue_period_s=0.05,
                             retrain_period_s=0.05, specs={"load": SPEC}, step=HOUR,
                             prefix=f"bad-{uid}")
    sched.start()
    try:
        assert sched.wait_for(errors=6, timeout=20)
        assert sched._thread is not None and sched._thread.is_alive()
    finally:
        sched.stop(timeout=20)
    assert "unknown" in sched.last_error.error and sched.issues == 0


def test_one_unknown_target_does_not_stop_the_others(engine, meters, service):
    """A target whose series does not resolve (a meter with no readings, a typo) used to
    make every retrain and issue of its kind fail, so no series of that kind was ever
    forecast; it is now an error of each cycle and the others are forecast."""
    prefix = f"mixed-{uuid.uuid4().hex[:6]}"
    service.clock = lambda: END + timedelta(hours=12, minutes=5)
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    add_meters(engine, [ghost])                     # registered, never read
    sched = ForecastSchedule(service, [*targets(meters), f"{ghost}:p_kw:load"],
                             issue_period_s=0.2, retrain_period_s=0, specs={"load": SPEC},
                             step=HOUR, prefix=prefix)
    sched.start()
    try:
        assert sched.wait_for(issues=1, timeout=60), sched.last_error
    finally:
        sched.stop(timeout=20)
    assert sched.errors >= 1 and ghost in sched.last_error.action
    sid = find_series(engine, meters[0], "p_kw").series_id
    assert latest_forecast(engine, sid).run.model_name == f"{prefix}-load"


def test_schedule_from_settings(engine, db_url, tmp_path):
    off = get_settings(database_url=db_url, data_dir=tmp_path)
    assert ForecastSchedule.from_settings(off, engine) is None
    on = get_settings(database_url=db_url, data_dir=tmp_path, forecast_period_s=900,
                      forecast_retrain_period_s=86_400, forecast_step_s=3600,
                      forecast_targets="a:p_kw:load, b:p_kw:pv")
    sched = ForecastSchedule.from_settings(on, engine)
    assert set(sched.groups) == {"load", "pv"} and sched.model_name("pv") == "auto-pv"
    assert sched.specs["pv"].kind == "pv" and sched.step == HOUR


def test_migration_0003_down_and_up(empty_db_url):
    url = empty_db_url
    upgrade(url)
    eng = make_engine(url)
    assert {"forecast_models", "forecast_runs", "forecast_values"} <= set(
        inspect(eng).get_table_names())
    downgrade(url, "0002")
    assert current_revision(url) == "0002"
    assert "forecast_runs" not in inspect(eng).get_table_names()
    upgrade(url, "0003")  # the head moves on with later migrations (0004: control)
    assert current_revision(url) == "0003"
    eng.dispose()


def test_a_pv_device_is_forecast_from_its_output_in_its_own_sign(engine, db_url, tmp_path):
    """A PV device's p_kw is stored import-positive (negative while it generates); the PV
    model clips at 0, so its forecast was 0 everywhere. The model now sees the output and
    the forecast comes back import-positive: negative by day, quantiles in order."""
    from derms.store.forecasts import latest_forecast as latest
    from derms.store.models import DerDevice, DerSite, DerType

    uid = uuid.uuid4().hex[:6]
    der = f"pv-{uid}"
    with make_session_factory(engine).begin() as s:
        s.add(DerSite(site_id=f"site-{uid}"))
        s.flush()
        s.add(DerDevice(der_id=der, site_id=f"site-{uid}", der_type=DerType.PV, s_max_kva=10.0,
                        p_gen_max_kw=10.0))
    t = pd.date_range(T0, periods=DAYS * 24, freq="h")
    h = t.hour.to_numpy()
    rng = np.random.default_rng(4)
    out_kw = np.clip(8 * np.sin(np.pi * (h - 6) / 12), 0, None) * rng.uniform(0.6, 1.0, len(t))
    write_readings(engine, pd.DataFrame({"der_id": der, "quantity": "p_kw", "value": -out_kw,
                                         "t": pd.Series(list(t), dtype=object), "source": "der"}))
    settings = get_settings(database_url=db_url, data_dir=tmp_path / "data")
    svc = ForecastService(settings, engine, clock=lambda: END + timedelta(minutes=5))
    spec = ForecastSpec(kind="pv", n_rounds=20, latitude=0.0, longitude=0.0)
    svc.retrain(f"pvdev-{uid}", [f"{der}:p_kw:pv"], spec, step=HOUR)
    svc.issue(f"pvdev-{uid}", END)
    sid = find_series(engine, der, "p_kw").series_id
    fc = latest(engine, sid).values
    assert (fc["p10"] <= fc["p50"] + 1e-9).all() and (fc["p50"] <= fc["p90"] + 1e-9).all()
    assert fc["p50"].min() < -3.0 and fc["p50"].max() <= 1e-6, fc


def test_hourly_readings_in_a_15_min_model_are_held_not_gaps(engine, db_url, tmp_path):
    """An hourly meter forecast by a 15-min model saw three of every four intervals as
    gaps; its readings are now held over their hour (with a warning)."""
    uid = uuid.uuid4().hex[:6]
    m = f"hourly-{uid}"
    add_meters(engine, [m])
    write_history(engine, [m])
    settings = get_settings(database_url=db_url, data_dir=tmp_path / "data")
    svc = ForecastService(settings, engine, clock=lambda: END + timedelta(minutes=5))
    res = svc.retrain(f"q15-{uid}", [f"{m}:p_kw:load"], SPEC, step=timedelta(minutes=15))
    assert any("held over" in w for w in res.warnings), res.warnings
    assert not any("missing" in w for w in res.warnings), res.warnings
