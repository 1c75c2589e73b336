"""The IEEE 2030.5 server's resources in the database (issue 8), SQLite and PostgreSQL:
migration 0006 matches the ``sep_*`` models and goes down and up; a repository with every
kind of resource is rebuilt equal from the database, ids and ``version`` continue; a failed
database write leaves memory as it was; idempotency holds across a restart; ``derms serve``
restarted on the same database serves what the management API created before."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import http.client
import os
import ssl
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from derms.cli.main import app as cli
from derms.protocols.ieee2030_5.model import (
    CURVE_TYPES,
    ControlSpec,
    DerLimits,
    LogEventRecord,
    MirrorReadingRecord,
    MirrorUsagePointRecord,
    ReadingTypeRecord,
    SubscriptionRecord,
)
from derms.protocols.ieee2030_5.sql_repository import PersistentRepository
from derms.store import sep
from derms.store.db import make_engine
from derms.store.migrate import current_revision, downgrade, head_revision, upgrade
from derms.store.models import Base
from tests.integration.conftest import mint_token

L1, L2, L3, AGG = "A1" * 20, "B2" * 20, "D4" * 20, "C3" * 20
T0 = datetime(2026, 7, 1, 10, 0, tzinfo=UTC)


@pytest.fixture
def url(empty_db_url):
    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def engine(url):
    eng = make_engine(url)
    yield eng
    eng.dispose()


def test_migration_0006_matches_the_model_and_goes_down_and_up(empty_db_url):
    url = empty_db_url
    upgrade(url)
    eng = make_engine(url)
    with eng.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "sep_" in repr(d)] == []
    assert {t.name for t in sep.SEP_TABLES} <= set(inspect(eng).get_table_names())
    downgrade(url, "0005")
    assert not [t for t in inspect(eng).get_table_names() if t.startswith("sep_")]
    upgrade(url)
    assert current_revision(url) == head_revision()
    eng.dispose()


# --------------------------------------------------------------------------- a full repository
def _reading(mrid: str, uom: int, phase: int = 0) -> MirrorReadingRecord:
    xml = f'<ReadingType xmlns="urn:ieee:std:2030.5:ns"><uom>{uom}</uom></ReadingType>'
    return MirrorReadingRecord(mrid, f"reading {mrid[:4]}", ReadingTypeRecord(
        uom=uom, power_of_ten_multiplier=-1, flow_direction=1, phase=phase, kind=37,
        accumulation_behaviour=12, data_qualifier=None, xml=xml.encode()))


def populate(repo: PersistentRepository) -> dict:
    """Every kind of resource, through every mutating method."""
    ids: dict = {}
    repo.add_aggregator(AGG)
    p1 = repo.add_program("DOE", 1)
    p2 = repo.add_program("other", 2)
    vv = repo.add_curve(p1.program_id, CURVE_TYPES["volt_var"], [92, 98, 102, 108],
                        [44, 0, 0, -44.5], 2, description="vv", ramp_dec_tms=500)
    f1 = repo.add_fsa("sites", [p1.program_id])
    f2 = repo.add_fsa("all", [p1.program_id, p2.program_id])
    e1 = repo.add_end_device(L1, pin=111115, nmi="4103000001", fsa_ids=[f1.fsa_id],
                             der_id="der-1", meter_id="m-1")
    e2 = repo.add_end_device(L2, owner_lfdi=AGG, nmi="4103000002")
    e3 = repo.add_end_device(L3, owner_lfdi="E5" * 20)  # a new aggregator with it
    repo.assign_fsa(e1.edev_id, f2.fsa_id)
    repo.assign_fsa(e2.edev_id, f1.fsa_id)
    repo.touch_end_device(e2.edev_id, T0)
    limits = DerLimits(exp_lim_w=1500.25, imp_lim_w=None, gen_lim_w=0.0, connect=True,
                       volt_var_curve_id=vv.curve_id)
    c_all = repo.add_control(p1.program_id, T0, 300, DerLimits(exp_lim_w=5000),
                             description="all", randomize_start_s=-30)
    c_dev = repo.add_control(p1.program_id, T0 + timedelta(minutes=5), 600, limits,
                             edev_id=e1.edev_id, randomize_duration_s=12, mrid="ab" * 16)
    (c_cp, _), (c_cp2, _) = repo.add_controls([
        ControlSpec(p1.program_id, T0, 300, DerLimits(imp_lim_w=7000), "cp",
                    connection_point="4103000002"),
        ControlSpec(p2.program_id, T0, 900, DerLimits(energize=False, target_w=-2500.5), "p2")])
    repo.cancel_control(c_all.control_id)
    repo.set_default_control(p1.program_id, DerLimits(exp_lim_w=1500), description="d")
    repo.set_default_control(p1.program_id, DerLimits(exp_lim_w=1000,
                                                      volt_var_curve_id=vv.curve_id),
                             description="d2", set_grad_w=270)
    repo.put_der_document(e1.edev_id, "DERSettings", b"<DERSettings>1</DERSettings>")
    repo.put_der_document(e1.edev_id, "DERSettings", b"<DERSettings>2</DERSettings>")
    repo.put_der_document(e2.edev_id, "DERStatus", b"\x00binary\xff")
    repo.add_response(c_dev.control_id, e1.edev_id, 1, T0)
    repo.add_response(c_dev.control_id, e1.edev_id, 2, None)
    repo.add_response(c_cp.control_id, e2.edev_id, None, T0)
    mup = MirrorUsagePointRecord(0, "0F" * 16, e1.edev_id, L1, L1, 0x0B, 0, 1,
                                 description="der", post_rate_s=60,
                                 readings=(_reading("01" * 16, 38), _reading("02" * 16, 63)))
    m1, _ = repo.add_mirror_usage_point(mup)
    repo.add_mirror_usage_point(dataclasses.replace(mup, readings=(_reading("03" * 16, 29, 128),),
                                                  post_rate_s=None, status=0))
    repo.add_mirror_readings(m1.mup_id, [_reading("04" * 16, 72)])
    m2, _ = repo.add_mirror_usage_point(MirrorUsagePointRecord(
        0, "1F" * 16, e2.edev_id, L2, AGG, 0x03, 0, 1))
    for k in range(3):
        repo.add_log_event(LogEventRecord(0, e1.edev_id, T0 + timedelta(seconds=k), 0, 3 + k,
                                          k, 0, 1, details="d" if k else None,
                                          extended_data=7 if k == 2 else None))
    s1, _ = repo.add_subscription(SubscriptionRecord(0, e1.edev_id, L1, "/edev/1/derp/1/derc",
                                                     "https://client/n", 10))
    repo.add_subscription(SubscriptionRecord(0, e1.edev_id, L1, "/edev/1/derp/1/derc",
                                             "https://client/n", 20, level="+S1", encoding=0))
    s2, _ = repo.add_subscription(SubscriptionRecord(0, e2.edev_id, AGG, "/edev/2",
                                                     "https://agg/n", 5))
    repo.delete_subscription(s2.subscription_id)  # the last id: never given again
    ids.update(p1=p1.program_id, p2=p2.program_id, e1=e1.edev_id, e2=e2.edev_id,
               e3=e3.edev_id, c_dev=c_dev, c_cp2=c_cp2, m1=m1.mup_id, m2=m2.mup_id,
               s1=s1.subscription_id, s2=s2.subscription_id, curve=vv.curve_id)
    return ids


def snapshot(repo: PersistentRepository) -> dict:
    """Everything the public methods return (with the fields that ``==`` leaves out)."""
    edevs = repo.end_devices()
    programs = repo.programs()
    controls = {p.program_id: repo.controls(p.program_id) for p in programs}
    all_controls = [c for cs in controls.values() for c in cs]
    mups = repo.mirror_usage_points()
    return {
        "edevs": edevs, "by_lfdi": [repo.end_device_by_lfdi(e.lfdi) for e in edevs],
        "visible": {lf: repo.end_devices_visible_to(lf) for lf in (L1, L2, L3, AGG)},
        "at": {cp: repo.end_devices_at(cp) for cp in ("4103000001", "4103000002")},
        "aggregators": repo.aggregators(), "fsas": repo.fsas(),
        "fsa": [repo.fsa(f.fsa_id) for f in repo.fsas()],
        "programs": programs, "controls": controls,
        "control": [repo.control(c.control_id) for c in all_controls],
        "by_mrid": [repo.control_by_mrid(c.mrid.lower()) for c in all_controls],
        "extra": [c.extra for c in all_controls],
        "device_controls": {(p.program_id, e.edev_id): repo.device_controls(
            p.program_id, e.edev_id, e.nmi) for p in programs for e in edevs},
        "defaults": [repo.default_control(p.program_id) for p in programs],
        "curves": {p.program_id: repo.curves(p.program_id) for p in programs},
        "docs": {(e.edev_id, k): repo.der_document(e.edev_id, k) for e in edevs
                 for k in ("DERSettings", "DERStatus", "DERCapability")},
        "responses": repo.responses(),
        "response": [repo.response(r.response_id) for r in repo.responses()],
        "mups": mups, "mup": [repo.mirror_usage_point(m.mup_id) for m in mups],
        "reading_xml": [r.reading_type.xml for m in mups for r in m.readings],
        "logs": {e.edev_id: repo.log_events(e.edev_id) for e in edevs},
        "subs": repo.subscriptions(),
        "subs_of": {e.edev_id: repo.subscriptions(e.edev_id) for e in edevs},
        "is_aggregator": [repo.is_aggregator(lf) for lf in (L1, AGG, "E5" * 20)],
    }


def test_everything_is_rebuilt_from_the_database_and_ids_continue(url, engine):
    repo = PersistentRepository(engine)
    ids = populate(repo)
    before, version = snapshot(repo), repo.version
    assert before["reading_xml"][0].startswith(b"<ReadingType")
    del repo
    engine2 = make_engine(url)
    try:
        again = PersistentRepository(engine2)
        after = snapshot(again)
        for key, value in before.items():
            assert after[key] == value, key
        assert again.version > version
        # the spot checks the records' equality covers, made explicit
        e1 = again.end_device(ids["e1"])
        assert (e1.fsa_ids, e1.nmi, e1.pin, e1.der_id, e1.meter_id) == (
            (1, 2), "4103000001", 111115, "der-1", "m-1")
        assert again.end_device(ids["e2"]).owner_lfdi == AGG
        assert again.end_device(ids["e2"]).changed_time == T0
        assert again.aggregators() == sorted([AGG, "E5" * 20])
        ctl = again.control(ids["c_dev"].control_id)
        assert ctl == ids["c_dev"] and ctl.limits.exp_lim_w == 1500.25
        cancelled = [c for c in again.controls(ids["p1"]) if c.description == "all"][0]
        assert cancelled.cancelled_time is not None and cancelled.version == 1
        dflt = again.default_control(ids["p1"])
        assert (dflt.version, dflt.set_grad_w, dflt.description) == (1, 270, "d2")
        assert again.curves(ids["p1"])[0].y == (44.0, 0.0, 0.0, -44.5)
        assert again.der_document(ids["e1"], "DERSettings")[0] == b"<DERSettings>2</DERSettings>"
        assert again.der_document(ids["e2"], "DERStatus")[0] == b"\x00binary\xff"
        m1 = again.mirror_usage_point(ids["m1"])
        assert [r.mrid for r in m1.readings] == ["01" * 16, "02" * 16, "03" * 16, "04" * 16]
        assert m1.readings[2].reading_type.phase == 128 and m1.post_rate_s == 60
        assert [e.log_event_code for e in again.log_events(ids["e1"])] == [5, 4, 3]
        (sub,) = again.subscriptions()
        assert sub.limit == 20 and sub.subscription_id == ids["s1"]

        # new ids continue after the old ones (also after a deleted last subscription)
        assert again.add_program("p3", 3).program_id == ids["p2"] + 1
        assert again.add_end_device("F6" * 20).edev_id == ids["e3"] + 1
        assert again.add_fsa("f3").fsa_id == 3
        assert again.add_control(ids["p1"], T0, 60, DerLimits()).control_id == \
            ids["c_cp2"].control_id + 1
        assert again.add_response(ids["c_cp2"].control_id, ids["e1"], 1, None)[0] \
            .response_id == 4
        assert again.add_mirror_usage_point(MirrorUsagePointRecord(
            0, "2F" * 16, ids["e1"], L1, L1, 0x01, 0, 1))[0].mup_id == ids["m2"] + 1
        assert again.add_curve(ids["p1"], 0, [50, 51], [100, 0], 1).curve_id == \
            ids["curve"] + 1
        assert again.add_log_event(LogEventRecord(0, ids["e1"], T0, 0, 9, 9, 0, 1)) \
            .log_event_id == 4
        new_sub, created = again.add_subscription(SubscriptionRecord(
            0, ids["e2"], AGG, "/edev/2", "https://agg/n", 5))
        assert created and new_sub.subscription_id == ids["s2"] + 1
        version2 = again.version
        del again
        third = PersistentRepository(engine2)
        assert third.version > version2
        assert third.subscriptions()[-1] == new_sub
        assert len(third.end_devices()) == 4 and len(third.programs()) == 3
    finally:
        engine2.dispose()


# --------------------------------------------------------------------------- failed writes
@contextlib.contextmanager
def failing(engine, table: str | None = None, on_commit: bool = False):
    """Make statements touching ``table`` (or the commit) fail like a lost database."""
    def before(conn, cursor, statement, params, context, executemany):
        if table is not None and table in statement and not statement.lstrip().upper() \
                .startswith("SELECT"):
            raise RuntimeError(f"database gone ({table})")

    def commit(conn):
        raise RuntimeError("database gone (commit)")

    event.listen(engine, "before_cursor_execute", before)
    if on_commit:
        event.listen(engine, "commit", commit)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)
        if on_commit:
            event.remove(engine, "commit", commit)


def _ops(ids: dict):
    e1, e2, p1 = ids["e1"], ids["e2"], ids["p1"]
    c_dev = ids["c_dev"]
    return {
        "add_end_device": ("sep_end_devices", lambda r: r.add_end_device(
            "F6" * 20, owner_lfdi="F7" * 20, fsa_ids=[1])),
        "touch_end_device": ("sep_end_devices", lambda r: r.touch_end_device(e1, T0)),
        "add_aggregator": ("sep_aggregators", lambda r: r.add_aggregator("F8" * 20)),
        "assign_fsa": ("sep_end_devices", lambda r: r.assign_fsa(ids["e3"], 2)),
        "add_fsa": ("sep_fsas", lambda r: r.add_fsa("x", [p1])),
        "add_program": ("sep_programs", lambda r: r.add_program("x", 5)),
        "add_controls": ("sep_controls", lambda r: r.add_controls([
            ControlSpec(p1, T0, 60, DerLimits(exp_lim_w=1), edev_id=e1),
            ControlSpec(p1, T0, 60, DerLimits(exp_lim_w=2), connection_point="x"),
            ControlSpec(p1, T0, 60, DerLimits(exp_lim_w=3))])),
        "cancel_control": ("sep_controls", lambda r: r.cancel_control(c_dev.control_id)),
        "set_default_control": ("sep_default_controls", lambda r: r.set_default_control(
            p1, DerLimits(exp_lim_w=1))),
        "add_curve": ("sep_curves", lambda r: r.add_curve(p1, 0, [50], [100], 1)),
        "put_der_document": ("sep_der_documents", lambda r: r.put_der_document(
            e1, "DERSettings", b"<new/>")),
        "add_response": ("sep_responses", lambda r: r.add_response(
            c_dev.control_id, e1, 3, None)),
        "add_mirror_usage_point": ("sep_mirror_readings", lambda r: r.add_mirror_usage_point(
            MirrorUsagePointRecord(0, "0F" * 16, e1, L1, L1, 0x0B, 0, 0,
                                   readings=(_reading("05" * 16, 38),)))),
        "add_mirror_usage_point_new": ("sep_mirror_usage_points",
                                       lambda r: r.add_mirror_usage_point(
                                           MirrorUsagePointRecord(0, "3F" * 16, e2, L2, AGG,
                                                                  0x03, 0, 1))),
        "add_mirror_readings": ("sep_mirror_readings", lambda r: r.add_mirror_readings(
            ids["m2"], [_reading("06" * 16, 38)])),
        "add_log_event": ("sep_log_events", lambda r: r.add_log_event(
            LogEventRecord(0, e1, T0, 0, 1, 1, 0, 1))),
        "add_subscription": ("sep_subscriptions", lambda r: r.add_subscription(
            SubscriptionRecord(0, e2, AGG, "/edev/2", "https://agg/other", 5))),
        "renew_subscription": ("sep_subscriptions", lambda r: r.add_subscription(
            SubscriptionRecord(0, e1, L1, "/edev/1/derp/1/derc", "https://client/n", 99))),
        "delete_subscription": ("sep_subscriptions", lambda r: r.delete_subscription(
            ids["s1"])),
    }


def test_a_failed_write_leaves_memory_unchanged(url, engine):
    repo = PersistentRepository(engine)
    ids = populate(repo)
    for name, (table, op) in _ops(ids).items():
        for on_commit in (False, True):
            before, version = snapshot(repo), repo.version
            with failing(engine, None if on_commit else table, on_commit), \
                    pytest.raises(RuntimeError, match="database gone"):
                op(repo)
            assert snapshot(repo) == before, (name, on_commit)
            assert repo.version == version, name
    # and the database agrees with memory; then every write goes through
    assert snapshot(PersistentRepository(engine)) == snapshot(repo)
    for name, (_table, op) in _ops(ids).items():
        op(repo)
        assert snapshot(PersistentRepository(engine)) == snapshot(repo), name


def test_a_constraint_violation_leaves_memory_unchanged(url, engine):
    repo = PersistentRepository(engine)
    p = repo.add_program("first", 1)
    with engine.begin() as conn:  # someone else took the next id behind its back
        conn.execute(text("INSERT INTO sep_programs (program_id, mrid, description, primacy, "
                          "version) VALUES (:i, 'FF', 'x', 1, 0)"), {"i": p.program_id + 1})
    version = repo.version
    with pytest.raises(IntegrityError):
        repo.add_program("second", 1)
    assert repo.programs() == [p] and repo.program(p.program_id + 1) is None
    assert repo.version == version
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM sep_programs WHERE mrid = 'FF'"))
    assert repo.add_program("second", 1).program_id == p.program_id + 1  # the id not lost


def test_readers_neither_wait_for_the_database_nor_see_uncommitted_changes(url, engine):
    import threading
    import time

    repo = PersistentRepository(engine)
    first = repo.add_program("first", 1)
    in_db, release = threading.Event(), threading.Event()

    def hold(conn, cursor, statement, params, context, executemany):
        if "INSERT INTO sep_programs" in statement:
            in_db.set()
            release.wait(10)

    event.listen(engine, "before_cursor_execute", hold)
    try:
        writer = threading.Thread(target=repo.add_program, args=("second", 2))
        writer.start()
        assert in_db.wait(10)
        version = repo.version
        t0 = time.perf_counter()
        for _ in range(100):
            assert repo.programs() == [first]  # the write is not committed yet
        assert repo.program(first.program_id + 1) is None and repo.version == version
        assert time.perf_counter() - t0 < 1.0  # not held by the open transaction
        release.set()
        writer.join(10)
    finally:
        release.set()
        event.remove(engine, "before_cursor_execute", hold)
    assert [p.description for p in repo.programs()] == ["first", "second"]
    assert repo.version > version


# --------------------------------------------------------------------------- idempotency
def test_idempotency_rules_hold_after_a_restart(url, engine):
    repo = PersistentRepository(engine)
    ids = populate(repo)
    c = ids["c_dev"]
    spec = ControlSpec(c.program_id, c.start, c.duration_s, c.limits, "again",
                       edev_id=c.edev_id, randomize_duration_s=c.randomize_duration_s,
                       mrid=c.mrid.lower())
    del repo
    again = PersistentRepository(engine)
    n_controls = len(again.controls(ids["p1"]))
    ((rec, created),) = again.add_controls([spec])
    assert not created and rec == c
    with pytest.raises(ValueError, match="already used"):
        again.add_controls([dataclasses.replace(spec, duration_s=1)])
    assert len(again.controls(ids["p1"])) == n_controls
    n_responses = len(again.responses())
    resp, created = again.add_response(c.control_id, ids["e1"], 1, T0)
    assert not created and resp.response_id == 1 and len(again.responses()) == n_responses
    mup, created = again.add_mirror_usage_point(MirrorUsagePointRecord(
        0, "0F" * 16, ids["e1"], L1, L1, 0x0B, 0, 1, readings=(_reading("01" * 16, 38),)))
    assert not created and mup.mup_id == ids["m1"] and len(mup.readings) == 4
    with pytest.raises(PermissionError):
        again.add_mirror_usage_point(MirrorUsagePointRecord(
            0, "0F" * 16, ids["e1"], L1, AGG, 0x0B, 0, 1))
    with pytest.raises(ValueError, match="already registered"):
        again.add_end_device(L1)
    sub, created = again.add_subscription(SubscriptionRecord(
        0, ids["e1"], L1, "/edev/1/derp/1/derc", "https://client/n", 20))
    assert not created and sub.subscription_id == ids["s1"]
    # what the retries stored is what a third start finds
    assert snapshot(PersistentRepository(engine)) == snapshot(again)


# --------------------------------------------------------------------------- derms serve
def test_serve_restart_keeps_devices_and_controls(tmp_path):
    from tests.integration.test_ieee2030_5_management import _Served

    pki = tmp_path / "pki"
    result = CliRunner().invoke(cli, ["certs", str(pki), "--device", "site1"])
    assert result.exit_code == 0, result.output
    with (pki / "identities.csv").open() as fh:
        lfdi = {r["name"]: r for r in csv.DictReader(fh)}["site1"]["lfdi"]
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    env = {**os.environ, "DERMS_DATABASE_URL": url, "DERMS_DATA_DIR": str(tmp_path)}
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    served = _Served(env, pki)
    try:
        served.wait_ready()
        admin, operate = mint_token(url, "admin"), mint_token(url, "operate")
        api = f"http://127.0.0.1:{served.port}/v1/ieee2030-5"
        with httpx.Client(timeout=10) as h:
            pid = h.post(f"{api}/programs", headers=admin,
                         json={"description": "DOE", "primacy": 1}).json()["program_id"]
            fsa = h.post(f"{api}/function-set-assignments", headers=admin,
                         json={"description": "sites", "program_ids": [pid]}).json()["fsa_id"]
            r = h.post(f"{api}/end-devices", headers=admin, json={
                "lfdi": lfdi, "pin": 111115, "connection_point": "4103000001",
                "fsa_ids": [fsa]})
            assert r.status_code == 201, r.text
            device = r.json()
            r = h.post(f"{api}/programs/{pid}/controls", headers=operate, json={
                "start": start.isoformat(), "duration_s": 3600, "export_limit_w": 1500,
                "connection_point": "4103000001"})
            assert r.status_code == 201, r.text
            control = r.json()
    finally:
        served.stop()
    served = _Served(env, pki)  # the same database file
    try:
        served.wait_ready()
        read = mint_token(url, "read")
        with httpx.Client(timeout=10) as h:
            base = f"http://127.0.0.1:{served.port}/v1/ieee2030-5"
            r = h.get(f"{base}/end-devices/{device['end_device_id']}", headers=read)
            assert r.status_code == 200, r.text
            assert r.json() == device
            items = h.get(f"{base}/programs/{pid}/controls", headers=read).json()["items"]
            assert [c["mrid"] for c in items] == [control["mrid"]]
            assert items[0] == control
        # and the device finds its control over mutual TLS
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(pki / "site1.pem", pki / "site1.key")
        conn = http.client.HTTPSConnection("localhost", served.sep_port, context=ctx,
                                           timeout=5)
        conn.request("GET", f"/sep2/edev/{device['end_device_id']}/derp/{pid}/derc")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200, body
        assert control["mrid"].encode() in body
    finally:
        served.stop()


def test_every_record_field_has_a_column():
    """A field added to a protocol record needs its column (and migration) here."""
    from derms.protocols.ieee2030_5 import model as m

    covered = {
        m.EndDeviceRecord: (sep.SepEndDevice, {}), m.FsaRecord: (sep.SepFsa, {}),
        m.ProgramRecord: (sep.SepProgram, {}), m.DerLimits: (sep.SepControl, {}),
        m.ControlRecord: (sep.SepControl, {"limits"}),
        m.DefaultControlRecord: (sep.SepDefaultControl, {"limits"}),
        m.CurveRecord: (sep.SepCurve, {}), m.ResponseRecord: (sep.SepResponse, {}),
        m.MirrorUsagePointRecord: (sep.SepMirrorUsagePoint, {"readings"}),
        m.MirrorReadingRecord: (sep.SepMirrorReading, {"reading_type"}),
        m.ReadingTypeRecord: (sep.SepMirrorReading, {}),
        m.LogEventRecord: (sep.SepLogEvent, {}),
        m.SubscriptionRecord: (sep.SepSubscription, {"limit"}),
    }
    for cls, (table, elsewhere) in covered.items():
        columns = set(table.__table__.columns.keys())
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in columns and f.name not in elsewhere]
        assert missing == [], (cls.__name__, missing)
    limits = {f.name for f in dataclasses.fields(m.DerLimits)}
    assert limits <= set(sep.SepDefaultControl.__table__.columns.keys())


def test_ended_controls_leave_memory_but_stay_stored(engine):
    """Memory stays bounded: controls that ended long ago (and their responses) are dropped
    from memory by the janitor and not loaded at start; the database keeps them."""
    from derms.protocols.ieee2030_5.server import ControlJanitor

    repo = PersistentRepository(engine)
    pid = repo.add_program("DOE", 1).program_id
    fsa = repo.add_fsa("all", [pid]).fsa_id
    dev = repo.add_end_device("A1" * 20, fsa_ids=[fsa]).edev_id
    now = datetime.now(UTC)
    old = repo.add_control(pid, now - timedelta(days=3), 600, DerLimits(exp_lim_w=1),
                           edev_id=dev)
    repo.add_response(old.control_id, dev, 1, None)
    new = repo.add_control(pid, now - timedelta(minutes=1), 600, DerLimits(exp_lim_w=2),
                           edev_id=dev)
    version = repo.version
    assert ControlJanitor(repo, 2 * 86_400, 3600).run_once() == 1
    assert repo.control(old.control_id) is None and repo.responses() == []
    assert repo.control(new.control_id) is not None and repo.version > version
    again = PersistentRepository(engine, keep_ended_controls_s=2 * 86_400)
    assert again.control(old.control_id) is None and again.control(new.control_id) == new
    everything = PersistentRepository(engine)  # still stored
    assert everything.control(old.control_id) == old and len(everything.responses()) == 1
    nxt = again.add_control(pid, now, 60, DerLimits(exp_lim_w=3), edev_id=dev)
    assert nxt.control_id > new.control_id  # ids never reused
