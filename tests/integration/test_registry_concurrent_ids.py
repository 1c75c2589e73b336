"""Two registrations of the same new id at once answer as they would one after the other.

``POST /v1/devices`` (and ``/meters``) read whether the id is registered, then insert it;
``/devices/batch`` (and ``/meters/batch``) read which of their ids are, before the feeder
lock, then insert the others. Two requests that both read "not registered" both inserted:
the second's insert broke the primary key and the database's IntegrityError was answered
500. The documented rule for a repeated registration, sequentially: a single registration
of an id already registered is 409 problem+json naming it (whatever its fields); a batch
lists such ids in ``existing`` and leaves them as they are (201). It holds under
concurrency now: the loser's transaction is rolled back and runs again, reading what the
winner stored.

The race is made deterministic by a barrier right after each request's id lookup (an
engine event on the app's engine): both requests have read "not registered" before
either inserts.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from derms.api.app import create_app
from derms.config import get_settings
from derms.store.models import AuditEntry, DerDevice, Meter
from tests.integration.conftest import mint_token

BARRIER_S = 20.0


@pytest.fixture
def api(db_url):
    app = create_app(get_settings(database_url=db_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client, mint_token(db_url, "admin")


@contextmanager
def _statements_meet(engine, matches: Callable[[str], bool], n: int = 2, *,
                     when: str = "after_cursor_execute") -> Iterator[list[bool]]:
    """Hold the first ``n`` statements ``matches`` accepts (one per request) at
    ``when`` (a SQLAlchemy cursor event) until all have arrived; yields a list that holds
    True once they met (False: one waited alone)."""
    barrier, met, arrived, lock = threading.Barrier(n), [], [0], threading.Lock()

    def hold(_conn, _cursor, statement, _params, _context, _many) -> None:
        if not matches(statement):
            return
        with lock:
            arrived[0] += 1
            if arrived[0] > n:  # a request's transaction running again
                return
        try:
            barrier.wait(BARRIER_S)
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)

    event.listen(engine, when, hold)
    try:
        yield met
    finally:
        event.remove(engine, when, hold)


def _both_read_first(engine, table: str, column: str, n: int = 2):
    """Hold the first ``n`` id lookups on ``table`` (one per request) until all have run."""
    pattern = f"FROM {table} WHERE {table}.{column}"
    return _statements_meet(engine, lambda s: pattern in " ".join(s.split()), n)


def _at_once(*calls: Callable[[], httpx.Response]) -> list[httpx.Response]:
    out: list[httpx.Response | None] = [None] * len(calls)

    def run(k: int) -> None:
        out[k] = calls[k]()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _dev(der_id: str, site_id: str, **kw) -> dict:
    return {"der_id": der_id, "site_id": site_id, "der_type": "pv", "s_max_kva": 5.0,
            "p_gen_max_kw": 5.0, **kw}


def _one_stored_one_409(app, answers: list[httpx.Response], model, key: str, what: str
                        ) -> httpx.Response:
    """The sequential answers: one 201, one 409 problem+json naming the id; one row and
    one audit entry. Returns the 201."""
    codes = sorted(r.status_code for r in answers)
    assert codes == [201, 409], [r.text for r in answers]
    won, lost = sorted(answers, key=lambda r: r.status_code)
    assert lost.headers["content-type"] == "application/problem+json"
    assert lost.json()["detail"] == f"{what} {key!r} exists"
    with app.state.sessions() as s:
        assert s.get(model, key) is not None
        assert s.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.entity_id == key)) == 1
    return won


@pytest.mark.parametrize("identical", [True, False])
def test_the_same_new_device_registered_twice_at_once(api, identical):
    app, c, admin = api
    der_id = f"d-{uuid.uuid4().hex[:6]}"
    bodies = [_dev(der_id, f"s-{der_id}"), _dev(der_id, f"s-{der_id}")] if identical else \
        [_dev(der_id, f"s1-{der_id}"), _dev(der_id, f"s2-{der_id}", s_max_kva=7.0)]
    with _both_read_first(app.state.engine, "der_devices", "der_id") as met:
        answers = _at_once(*(lambda b=b: c.post("/v1/devices", headers=admin, json=b)
                             for b in bodies))
    assert met == [True, True]
    won = _one_stored_one_409(app, answers, DerDevice, der_id, "device")
    with app.state.sessions() as s:  # the winner's fields, the winner's site
        dev = s.get(DerDevice, der_id)
        assert (dev.site_id, dev.s_max_kva) == (won.json()["site_id"], won.json()["s_max_kva"])


def test_the_same_new_meter_registered_twice_at_once(api):
    app, c, admin = api
    meter_id = f"m-{uuid.uuid4().hex[:6]}"
    body = {"meter_id": meter_id, "bus": "b1", "phase": "a"}
    with _both_read_first(app.state.engine, "meters", "meter_id") as met:
        answers = _at_once(*(lambda: c.post("/v1/meters", headers=admin, json=body),) * 2)
    assert met == [True, True]
    _one_stored_one_409(app, answers, Meter, meter_id, "meter")


def _batches_as_in_sequence(answers: list[httpx.Response], batches: list[list[str]]) -> None:
    """The sequential answers of two overlapping batches, in either order: the first
    creates all its ids, the second the others and lists the shared ones in ``existing``."""
    assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
    got = [r.json() for r in answers]
    shared = sorted(set(batches[0]) & set(batches[1]))
    first_won = [{"created": batches[0], "existing": []},
                 {"created": [i for i in batches[1] if i not in shared], "existing": shared}]
    second_won = [{"created": [i for i in batches[0] if i not in shared], "existing": shared},
                  {"created": batches[1], "existing": []}]
    assert got in (first_won, second_won), got


def test_overlapping_device_batches_at_once(api):
    """Both batches on one feeder: its lock orders the inserts, but the id lookup was
    read before it."""
    app, c, admin = api
    u = uuid.uuid4().hex[:6]
    fid = f"cf-{u}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    batches = [[f"d0-{u}", f"d1-{u}", f"d2-{u}"], [f"d1-{u}", f"d2-{u}", f"d3-{u}"]]
    bodies = [{"devices": [_dev(i, f"s-{i}", feeder_id=fid) for i in b]} for b in batches]
    with _both_read_first(app.state.engine, "der_devices", "der_id") as met:
        answers = _at_once(*(lambda b=b: c.post("/v1/devices/batch", headers=admin, json=b)
                             for b in bodies))
    assert met == [True, True]
    _batches_as_in_sequence(answers, batches)
    with app.state.sessions() as s:
        assert s.scalar(select(func.count()).select_from(DerDevice).where(
            DerDevice.der_id.in_(batches[0] + batches[1]))) == 4


def test_overlapping_meter_batches_at_once(api):
    app, c, admin = api
    u = uuid.uuid4().hex[:6]
    batches = [[f"m0-{u}", f"m1-{u}"], [f"m1-{u}", f"m2-{u}"]]
    bodies = [{"meters": [{"meter_id": i, "bus": "b1"} for i in b]} for b in batches]
    with _both_read_first(app.state.engine, "meters", "meter_id") as met:
        answers = _at_once(*(lambda b=b: c.post("/v1/meters/batch", headers=admin, json=b)
                             for b in bodies))
    assert met == [True, True]
    _batches_as_in_sequence(answers, batches)


@contextmanager
def _slow_inserts(engine, table: str, column: str, prefix: str) -> Iterator[None]:
    """PostgreSQL: every insert into ``table`` of a ``column`` starting with ``prefix``
    waits 0.3 s before its key goes in (a row trigger), so two batches that start together
    insert their rows in step. Nothing on SQLite (one writer at a time)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    fn, trigger = f"derms_test_slow_{table}", f"derms_test_slow_{table}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$")
        conn.exec_driver_sql(f"CREATE TRIGGER {trigger} BEFORE INSERT ON {table} FOR EACH ROW "
                             f"WHEN (starts_with(NEW.{column}, '{prefix}')) "
                             f"EXECUTE FUNCTION {fn}()")
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TRIGGER {trigger} ON {table}")
            conn.exec_driver_sql(f"DROP FUNCTION {fn}()")


@pytest.mark.parametrize("what", ["devices", "meters"])
def test_batches_of_the_same_new_ids_in_opposite_orders(api, what):
    """[a, b] and [b, a] at once: each inserted its first row, then waited for the other's
    (PostgreSQL ended one with a deadlock error, 500). Rows now go in in key order."""
    app, c, admin = api
    u = uuid.uuid4().hex[:6]
    ids = [f"slow-a-{u}", f"slow-b-{u}"]
    batches = [ids, ids[::-1]]
    table, column = ("der_devices", "der_id") if what == "devices" else ("meters", "meter_id")
    if what == "devices":
        bodies = [{"devices": [_dev(i, f"s{k}-{i}") for i in b]}  # (sites not shared)
                  for k, b in enumerate(batches)]
    else:
        bodies = [{"meters": [{"meter_id": i} for i in b]} for b in batches]
    with _slow_inserts(app.state.engine, table, column, "slow-"), \
            _both_read_first(app.state.engine, table, column) as met:
        answers = _at_once(*(lambda b=b: c.post(f"/v1/{what}/batch", headers=admin, json=b)
                             for b in bodies))
    assert met == [True, True]
    _batches_as_in_sequence(answers, batches)
