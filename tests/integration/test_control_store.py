"""Control requests in the store (SQLite and PostgreSQL): migration 0004, audit, and a
restart that rebuilds the arbiter's decisions without re-applying anything expired."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError

from derms.control import persistence
from derms.control.arbiter import OVERRIDDEN, RequestConflict
from derms.control.requests import CommandKind, ControlRequest, Scope, Source
from derms.control.state import ControlState
from derms.store.audit import read_audit
from derms.store.db import make_engine, make_session_factory
from derms.store.migrate import current_revision, downgrade, head_revision, upgrade
from derms.store.models import (
    AuditEntry,
    Base,
    ControlRequestRecord,
    DerDevice,
    DerSite,
    DerType,
    Feeder,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
MIN, H = timedelta(minutes=1), timedelta(hours=1)


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def seed(engine) -> dict[str, str]:
    """A feeder with two battery sites: d1 on bus 671, d2 on bus 680."""
    u = uuid.uuid4().hex[:8]
    ids = {"f": f"f-{u}", "d1": f"d1-{u}", "d2": f"d2-{u}", "s1": f"s1-{u}", "s2": f"s2-{u}"}
    with make_session_factory(engine).begin() as s:
        s.add(Feeder(feeder_id=ids["f"]))
        s.flush()
        for d, site, bus in (("d1", "s1", "671"), ("d2", "s2", "680")):
            s.add(DerSite(site_id=ids[site], feeder_id=ids["f"], bus=bus))
            s.flush()
            s.add(DerDevice(der_id=ids[d], site_id=ids[site], der_type=DerType.BATTERY,
                            s_max_kva=10, p_gen_max_kw=8, p_charge_max_kw=8, e_max_kwh=20))
    return ids


def test_migration_0004_matches_the_model_and_goes_down_and_up(empty_db_url):
    url = empty_db_url
    upgrade(url)
    eng = make_engine(url)
    with eng.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    mine = [d for d in diffs if "control_requests" in repr(d)]
    assert mine == []
    downgrade(url, "0003")
    assert "control_requests" not in inspect(eng).get_table_names()
    upgrade(url)
    assert current_revision(url) == head_revision()
    assert "control_requests" in inspect(eng).get_table_names()
    eng.dispose()


def test_the_database_refuses_a_switch_command_and_bad_limits(engine):
    factory = make_session_factory(engine)
    base = dict(source="adms", scope_kind="feeder", feeder_id="f", start=T0, expiry=T0 + H,
                issued_at=T0, actor="t", reason="")
    for bad in ({"kind": "open_switch"}, {"kind": "regulator_tap"},
                {"kind": "limit_export", "value_kw": -1.0},
                {"kind": "block_dispatch", "expiry": T0}):
        with pytest.raises(IntegrityError), factory.begin() as s:
            s.add(ControlRequestRecord(request_id=f"bad-{uuid.uuid4().hex[:8]}",
                                       **{**base, **bad}))


def test_restart_rebuilds_the_same_decisions_and_nothing_expired_is_reapplied(engine, db_url):
    ids = seed(engine)
    u, f, d1, d2 = ids["f"][2:], ids["f"], ids["d1"], ids["d2"]
    reqs = [
        ControlRequest(f"opt-{u}", Source.OPTIMISATION, CommandKind.OPTIMISATION_SETPOINT,
                       Scope.device(d1), T0, T0 + 3 * H, value_kw=-6.0, reason="peak plan"),
        ControlRequest(f"op-{u}", Source.OPERATOR, CommandKind.OPERATOR_SETPOINT,
                       Scope.device(d1), T0, T0 + 2 * H, value_kw=2.0, reason="test charge"),
        ControlRequest(f"blk-{u}", Source.ADMS, CommandKind.BLOCK_DISPATCH,
                       Scope.section(f, "zone-a", ["671"]), T0, T0 + H, reason="fault"),
        ControlRequest(f"lim-{u}", Source.ADMS, CommandKind.LIMIT_EXPORT, Scope.feeder(f),
                       T0, T0 + 3 * H, value_kw=250.0, reason="restoration"),
    ]
    factory = make_session_factory(engine)
    with factory.begin() as s:
        for r in reqs:
            assert persistence.submit(s, r, actor="test")[1]
    with factory.begin() as s:  # an idempotent resend writes nothing
        assert persistence.submit(s, reqs[0], actor="test")[1] is False
    with pytest.raises(RequestConflict), factory.begin() as s:
        persistence.submit(s, ControlRequest(f"opt-{u}", Source.OPTIMISATION,
                                             CommandKind.OPTIMISATION_SETPOINT, Scope.device(d1),
                                             T0, T0 + 3 * H, value_kw=-7.0), actor="test")

    before = ControlState(factory)
    t = T0 + 30 * MIN
    first = before.arbitrate(t, _locs(factory, [d1, d2]))
    assert first[d1].blocked_by == f"blk-{u}" and first[d1].setpoint_kw is None
    assert first[d1].ruling(f"op-{u}").outcome == OVERRIDDEN
    assert first[d2].blocked is False and first[d2].limit(
        CommandKind.LIMIT_EXPORT, Scope.feeder(f).kind) == 250.0
    n_arb = _count(engine, "arbitrate", d1)
    before.arbitrate(t, _locs(factory, [d1, d2]))
    assert _count(engine, "arbitrate", d1) == n_arb  # unchanged decision: not re-audited

    # "restart": a new engine, a new state built only from the database
    eng2 = make_engine(db_url)
    after = ControlState(make_session_factory(eng2))
    again = after.arbitrate(t, _locs(factory, [d1, d2]))
    assert {k: v.to_dict() for k, v in again.items()} == {k: v.to_dict() for k, v in first.items()}

    # the block expires at T0 + 1 h; two restarts later it is audited once, never re-applied
    t2 = T0 + 90 * MIN
    for _ in range(2):
        state = ControlState(make_session_factory(eng2))
        d = state.arbitrate(t2, _locs(factory, [d1]))[d1]
        assert f"blk-{u}" not in state.arbiter
        assert not d.blocked and (d.setpoint_kw, d.setpoint_by) == (2.0, f"op-{u}")
    with factory() as s:
        expiries = sorted(read_audit(s, entity="control_request", entity_id=f"blk-{u}"),
                          key=lambda e: e.id)  # simulated times: order of writing
    assert [e.action for e in expiries] == ["submit", "expire"]
    assert expiries[1].detail["expiry"] == (T0 + H).isoformat()

    with factory.begin() as s:
        w, changed = persistence.withdraw(s, f"op-{u}", T0 + 100 * MIN, actor="op1",
                                          reason="done", sources=[Source.OPERATOR])
    assert changed and w.withdrawn_at == T0 + 100 * MIN
    with pytest.raises(RequestConflict, match="may withdraw only operator"), factory.begin() as s:
        persistence.withdraw(s, f"lim-{u}", T0 + 100 * MIN, actor="op1", sources=[Source.OPERATOR])
    with pytest.raises(persistence.UnknownRequest), factory.begin() as s:
        persistence.withdraw(s, f"nope-{u}", T0, actor="op1")
    d = ControlState(make_session_factory(eng2)).arbitrate(
        T0 + 110 * MIN, _locs(factory, [d1]))[d1]
    assert (d.setpoint_kw, d.setpoint_by) == (-6.0, f"opt-{u}")
    with factory() as s:
        actions = [(e.action, e.entity_id) for e in s.scalars(
            select(AuditEntry).where(AuditEntry.entity_id.in_(
                [r.request_id for r in reqs] + [d1])).order_by(AuditEntry.id))]
        arb = sorted((e for e in read_audit(s, entity="der_device", entity_id=d1)
                      if e.action == "arbitrate"), key=lambda e: e.id)
    assert sum(a == "submit" for a, _ in actions) == 4
    assert ("withdraw", f"op-{u}") in actions
    assert arb[0].detail["blocked_by"] == f"blk-{u}" and "blocked by" in arb[0].detail["reason"]
    assert {r["outcome"] for r in arb[0].detail["rulings"]} >= {"applied", "overridden"}
    assert arb[-1].detail["setpoint_by"] == f"opt-{u}"
    eng2.dispose()


def _locs(factory, der_ids):
    with factory() as s:
        return persistence.device_locations(s, der_ids)


def _count(engine, action: str, entity_id: str) -> int:
    with engine.connect() as c:
        return c.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == action, AuditEntry.entity_id == entity_id))
