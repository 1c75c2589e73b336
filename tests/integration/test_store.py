"""derms.store on both backends: SQLite in a temporary folder and the real PostgreSQL on
127.0.0.1:5432 (a fresh database ``derms_test_<random>`` per session, dropped afterwards;
skipped only if the server is unreachable)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import selectinload

from derms.errors import InputError
from derms.store.audit import append_audit, read_audit
from derms.store.db import make_engine, make_session_factory
from derms.store.migrate import current_revision, head_revision, upgrade
from derms.store.models import (
    DerDevice,
    DerGroup,
    DerSite,
    DerType,
    DeviceStatus,
    Feeder,
    FeederModelVersion,
    GroupKind,
    Meter,
    Phase,
    Protocol,
)
from derms.store.timeseries import Quality, ReadingRow, read_readings, write_readings, write_series
from tests.integration.conftest import pg_create as _pg_create
from tests.integration.conftest import pg_drop as _pg_drop
from tests.integration.conftest import pg_url as _pg_url

T0 = datetime(2026, 1, 1, tzinfo=UTC)



@pytest.fixture(scope="session")
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def uid():
    return uuid.uuid4().hex[:8]


@pytest.fixture
def device(engine, uid):
    """A feeder, a site and a battery with its nameplate; returns the der_id."""
    with make_session_factory(engine).begin() as s:
        s.add(Feeder(feeder_id=f"f-{uid}", name="test feeder"))
        s.flush()
        s.add(DerSite(site_id=f"s-{uid}", feeder_id=f"f-{uid}", bus="671"))
        s.flush()
        s.add(DerDevice(der_id=f"d-{uid}", site_id=f"s-{uid}", der_type=DerType.BATTERY,
                        s_max_kva=5.0, p_gen_max_kw=5.0, p_charge_max_kw=5.0, e_max_kwh=13.5))
    return f"d-{uid}"


def test_upgrade_from_empty_creates_schema_and_is_idempotent(backend, tmp_path):
    name = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh' / 'derms.db'}"
    else:
        name = _pg_create()
        url = _pg_url(name)
    try:
        assert current_revision(url) is None
        upgrade(url)
        assert current_revision(url) == head_revision() is not None
        upgrade(url)  # a no-op the second time
        assert current_revision(url) == head_revision()
        eng = make_engine(url)
        tables = set(inspect(eng).get_table_names())
        eng.dispose()
        assert {"feeders", "feeder_model_versions", "der_sites", "der_devices", "der_groups",
                "der_group_members", "meters", "series", "readings", "topology_events",
                "alarms", "audit_log", "alembic_version"} <= tables
    finally:
        if name:
            _pg_drop(name)


def test_sqlite_pragmas(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'a' / 'b.db'}")
    with eng.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    eng.dispose()


def test_crud_feeder_device_group(engine, uid):
    factory = make_session_factory(engine)
    with factory.begin() as s:
        s.add(Feeder(feeder_id=f"f-{uid}", name="ieee13", substation="sub1"))
        s.flush()
        s.add(FeederModelVersion(feeder_id=f"f-{uid}", version=1, source_uri="ieee13/Master.dss"))
        s.add(DerSite(site_id=f"s-{uid}", feeder_id=f"f-{uid}", bus="671",
                      service_transformer="xfm1", owner="alice"))
        s.flush()
        s.add(DerDevice(
            der_id=f"pv-{uid}", site_id=f"s-{uid}", der_type=DerType.PV, p_gen_max_kw=7.6,
            s_max_kva=8.0, q_max_kvar=4.4, q_min_kvar=-4.4, phase=Phase.A, bus="671",
            service_transformer="xfm1", owner="alice", aggregator="agg1",
            protocol=Protocol.IEEE2030_5, endpoint="https://agg1.example/edev/1",
            status=DeviceStatus.ACTIVE))
        s.add(Meter(meter_id=f"m-{uid}", site_id=f"s-{uid}", feeder_id=f"f-{uid}", phase=Phase.A))
        s.flush()
        s.add(DerGroup(group_id=f"g-{uid}", kind=GroupKind.TRANSFORMER, key="xfm1",
                       feeder_id=f"f-{uid}", members=[s.get(DerDevice, f"pv-{uid}")]))
    with factory() as s:
        d = s.get(DerDevice, f"pv-{uid}")
        assert (d.der_type, d.p_gen_max_kw, d.s_max_kva, d.q_min_kvar, d.phase, d.protocol) == (
            DerType.PV, 7.6, 8.0, -4.4, Phase.A, Protocol.IEEE2030_5)
        assert d.e_max_kwh is None and d.status == DeviceStatus.ACTIVE
        assert d.created_at.tzinfo is not None and d.created_at.utcoffset() == timedelta(0)
        with pytest.raises(Exception, match="lazy='raise'|raise"):
            _ = d.site  # relationships never load implicitly
        g = s.scalars(select(DerGroup).options(selectinload(DerGroup.members))
                      .where(DerGroup.group_id == f"g-{uid}")).one()
        assert [m.der_id for m in g.members] == [f"pv-{uid}"]
        f = s.scalars(select(Feeder).options(selectinload(Feeder.model_versions))
                      .where(Feeder.feeder_id == f"f-{uid}")).one()
        assert [v.version for v in f.model_versions] == [1]
    with factory.begin() as s:
        s.get(DerDevice, f"pv-{uid}").status = DeviceStatus.INACTIVE
    with factory.begin() as s:
        assert s.get(DerDevice, f"pv-{uid}").status == DeviceStatus.INACTIVE
        s.delete(s.get(DerGroup, f"g-{uid}"))
    with factory() as s:
        assert s.get(DerGroup, f"g-{uid}") is None
        assert s.get(DerDevice, f"pv-{uid}") is not None


def test_check_constraints(engine, device, uid):
    with pytest.raises(DBAPIError), make_session_factory(engine).begin() as s:
        s.add(DerDevice(der_id=f"bad-{uid}", site_id=f"s-{uid}", der_type=DerType.PV,
                        s_max_kva=5.0, q_min_kvar=1.0))  # q_min_kvar must be <= 0


def test_bulk_write_and_exact_time_range_read(engine, device):
    n = 100_000
    t = pd.date_range(T0, periods=n, freq="1s")
    rng = np.random.default_rng(0)
    v = rng.normal(3.0, 1.0, n)
    res = write_series(engine, t, v, der_id=device, quantity="p_kw", source="scada")
    assert (res.inserted, res.duplicates) == (n, 0)
    start, end = t[10_000].to_pydatetime(), t[60_000].to_pydatetime()
    df = read_readings(engine, der_id=device, quantity="p_kw", start=start, end=end)
    assert len(df) == 50_000  # [start, end)
    assert str(df["t"].dt.tz) == "UTC"
    pd.testing.assert_index_equal(pd.DatetimeIndex(df["t"]).as_unit("ns"),
                                  t[10_000:60_000].as_unit("ns"), check_names=False,
                                  check_freq=False)
    assert df["t"].iloc[0].to_pydatetime() == datetime(2026, 1, 1, 2, 46, 40, tzinfo=UTC)
    np.testing.assert_array_equal(df["value"].to_numpy(), v[10_000:60_000])
    assert (df["quality"] == 0).all() and (df["source"] == "scada").all()


def test_same_batch_twice_is_stored_once(engine, device):
    t = pd.date_range(T0, periods=5_000, freq="15min")
    v = np.arange(5_000, dtype=float)
    assert write_series(engine, t, v, der_id=device, quantity="soc_frac").inserted == 5_000
    again = write_series(engine, t, v + 1, der_id=device, quantity="soc_frac")
    assert (again.inserted, again.duplicates) == (0, 5_000)
    df = read_readings(engine, der_id=device, quantity="soc_frac", start=T0,
                       end=T0 + timedelta(days=365))
    assert len(df) == 5_000
    np.testing.assert_array_equal(df["value"].to_numpy(), v)  # first value wins
    # duplicates inside one batch are dropped and counted as well
    t2 = pd.DatetimeIndex([T0 - timedelta(hours=1)] * 3)
    res = write_series(engine, t2, [1.0, 2.0, 3.0], der_id=device, quantity="soc_frac")
    assert (res.inserted, res.duplicates) == (1, 2)


def test_out_of_order_and_late_rows_accepted(engine, device, uid):
    with make_session_factory(engine).begin() as s:
        s.add(Meter(meter_id=f"m-{uid}"))
    times = [T0 + timedelta(minutes=m) for m in (30, 0, 45, 15)]
    rows = [ReadingRow("v_v", ti, 240.0 + i, meter_id=f"m-{uid}", source="ami")
            for i, ti in enumerate(times)]
    assert write_readings(engine, rows).inserted == 4
    late = [ReadingRow("v_v", T0 - timedelta(days=2), 239.0, meter_id=f"m-{uid}", source="ami",
                       quality=Quality.ESTIMATED)]
    assert write_readings(engine, late).inserted == 1
    # a DataFrame with several series (a device and a meter) in one call
    frame = pd.DataFrame({"t": pd.DatetimeIndex(times).tz_convert("Europe/Paris"),
                          "value": [1.0, 2.0, 3.0, 4.0], "quantity": "p_kw",
                          "der_id": [device, None, device, None],
                          "meter_id": [None, f"m-{uid}", None, f"m-{uid}"]})
    assert write_readings(engine, frame).inserted == 4
    df = read_readings(engine, meter_id=f"m-{uid}", quantity="v_v", start=T0 - timedelta(days=3),
                       end=T0 + timedelta(days=1))
    assert list(df["t"]) == [T0 - timedelta(days=2)] + sorted(times)
    assert list(df["value"]) == [239.0, 241.0, 243.0, 240.0, 242.0]
    assert df["quality"].iloc[0] == Quality.ESTIMATED
    dp = read_readings(engine, der_id=device, quantity="p_kw", start=T0, end=T0 + timedelta(hours=1))
    assert list(dp["t"]) == [times[0], times[2]] and list(dp["value"]) == [1.0, 3.0]



def test_downsampling_means(engine, device):
    t = pd.date_range(T0, periods=24 * 60, freq="1min")  # one day of minutes
    v = np.arange(len(t), dtype=float)
    write_series(engine, t, v, der_id=device, quantity="q_kvar")
    df = read_readings(engine, der_id=device, quantity="q_kvar", start=T0,
                       end=T0 + timedelta(days=1), bucket=timedelta(hours=1))
    assert len(df) == 24 and (df["n"] == 60).all()
    np.testing.assert_allclose(df["value"].to_numpy(), v.reshape(24, 60).mean(axis=1))
    assert list(df["t"]) == [T0 + timedelta(hours=h) for h in range(24)]
    # buckets are aligned to UTC, whatever the zone of the query bounds
    off = read_readings(engine, der_id=device, quantity="q_kvar",
                        start=(T0 + timedelta(minutes=90)).astimezone(
                            pd.Timestamp(0, tz="Asia/Kolkata").tzinfo),
                        end=T0 + timedelta(hours=3), bucket=timedelta(hours=1))
    assert list(off["t"]) == [T0 + timedelta(hours=1), T0 + timedelta(hours=2)]
    assert list(off["n"]) == [30, 60]


def test_audit_log_is_append_only(engine, uid):
    factory = make_session_factory(engine)
    with factory.begin() as s:
        e = append_audit(s, actor="op1", action="override", entity="der", entity_id=uid,
                         detail={"p_gen_max_kw": 2.5})
        entry_id = e.id
    with factory() as s:
        [got] = read_audit(s, entity="der", entity_id=uid)
        assert got.detail == {"p_gen_max_kw": 2.5} and got.t.tzinfo is not None
    for sql in ("UPDATE audit_log SET actor = 'mallory' WHERE id = :i",
                "DELETE FROM audit_log WHERE id = :i"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(sql), {"i": entry_id})
    with pytest.raises(DBAPIError, match="append-only"), factory.begin() as s:
        s.get(type(got), entry_id).actor = "mallory"
    with factory() as s:
        assert [a.actor for a in read_audit(s, entity_id=uid)] == ["op1"]


def test_naive_datetimes_rejected(engine, device):
    naive = datetime(2026, 1, 1)
    with pytest.raises(InputError, match="naive"):
        write_series(engine, [naive], [1.0], der_id=device, quantity="p_kw")
    with pytest.raises(InputError, match="naive"):
        write_series(engine, pd.date_range(naive, periods=3, freq="1s"), [1.0] * 3,
                     der_id=device, quantity="p_kw")
    with pytest.raises(InputError, match="naive"):
        write_series(engine, np.array(["2026-01-01"], dtype="datetime64[us]"), [1.0],
                     der_id=device, quantity="p_kw")
    with pytest.raises(InputError, match="naive"):
        write_readings(engine, [ReadingRow("p_kw", naive, 1.0, der_id=device)])
    with pytest.raises(InputError, match="naive"):
        read_readings(engine, der_id=device, quantity="p_kw", start=naive, end=T0)
    with pytest.raises(InputError, match="naive"):
        Feeder(feeder_id="x", created_at=naive)
    with pytest.raises(InputError, match="naive"), make_session_factory(engine)() as s:
        append_audit(s, actor="a", action="b", entity="c", t=naive)


def test_bad_input_rejected(engine, device):
    t = pd.date_range(T0, periods=2, freq="1s")
    with pytest.raises(InputError, match="quantity"):
        write_series(engine, t, [1.0, 2.0], der_id=device, quantity="power")
    assert write_series(engine, t, [0.9, 1.0], der_id=device, quantity="pf").inserted == 2
    with pytest.raises(InputError, match="unknown device"):
        write_series(engine, t, [1.0, 2.0], der_id="no-such-device", quantity="p_kw")
    with pytest.raises(InputError, match="non-finite"):
        write_series(engine, t, [1.0, np.nan], der_id=device, quantity="p_kw")
    with pytest.raises(InputError, match="exactly one"):
        write_series(engine, t, [1.0, 2.0], quantity="p_kw")


def test_settings_defaults_and_env(tmp_path, monkeypatch):
    from derms.config import get_settings

    monkeypatch.delenv("DERMS_DATABASE_URL", raising=False)
    monkeypatch.setenv("DERMS_DATA_DIR", str(tmp_path / "data"))
    s = get_settings()
    assert s.data_dir == tmp_path / "data"
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'derms.db'}"
    monkeypatch.setenv("DERMS_DATABASE_URL", "postgresql://u@h/db")
    assert get_settings().database_url == "postgresql://u@h/db"
    assert make_engine(get_settings().database_url).dialect.driver == "psycopg"
    assert get_settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"


def test_a_quantity_holding_the_series_key_separator_names_no_other_series(engine, device, uid):
    """Series keys are text joined by \\x1f; an owner may hold one (the split is from the
    right), but a quantity holding one would name another device's series (an independent
    review of the text-keyed cache): refused."""
    with make_session_factory(engine).begin() as s:
        s.add(DerDevice(der_id=f"{device}\x1fx", site_id=f"s-{uid}", der_type=DerType.PV,
                        s_max_kva=1.0, p_gen_max_kw=1.0))
    other = pd.DataFrame({"t": pd.DatetimeIndex([T0]), "value": [1.0], "quantity": "p_kw",
                          "der_id": [f"{device}\x1fx"]})
    assert write_readings(engine, other, series_cache={}).inserted == 1
    bad = pd.DataFrame({"t": pd.DatetimeIndex([T0 + timedelta(minutes=1)]), "value": [2.0],
                        "quantity": "x\x1fp_kw", "der_id": [device]})
    with pytest.raises(InputError, match="is not a quantity"):
        write_readings(engine, bad, series_cache={})
