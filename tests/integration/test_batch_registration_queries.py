"""A batch registration looks its ids up in the registry once.

``POST /v1/devices/batch`` (and ``/v1/meters/batch``) read which of the batch's ids were
already registered twice per request: once to leave them out of the placement check and
again, in the insert's transaction, to leave them out of the insert. Counted here with
SQLAlchemy's ``before_cursor_execute`` on the app's engine."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from derms.api.app import create_app
from derms.config import get_settings
from tests.integration.conftest import mint_token


@pytest.fixture
def api(db_url):
    app = create_app(get_settings(database_url=db_url))
    with TestClient(app) as client:
        yield app, client, mint_token(db_url, "admin")


@contextmanager
def _statements(engine) -> Iterator[list[str]]:
    """Every SQL statement run on ``engine`` meanwhile, whitespace collapsed."""
    seen: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _many) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _id_lookups(statements: list[str], table: str, column: str) -> list[str]:
    pattern = re.compile(rf"^SELECT {table}\.{column} FROM {table} WHERE {table}\.{column} IN ")
    return [s for s in statements if pattern.match(s)]


def test_a_device_batch_looks_its_ids_up_once(api):
    app, c, admin = api
    u = uuid.uuid4().hex[:6]
    fid = f"q-{u}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    rows = [{"der_id": f"d{k}-{u}", "site_id": f"s{k}-{u}", "feeder_id": fid,
             "der_type": "pv", "s_max_kva": 5.0, "p_gen_max_kw": 5.0, "bus": f"b{k}"}
            for k in range(4)]
    assert c.post("/v1/devices/batch", headers=admin,
                  json={"devices": rows[:2]}).status_code == 201
    with _statements(app.state.engine) as seen:
        r = c.post("/v1/devices/batch", headers=admin, json={"devices": rows})
    assert r.status_code == 201, r.text
    assert r.json() == {"created": [f"d2-{u}", f"d3-{u}"],
                        "existing": [f"d0-{u}", f"d1-{u}"]}
    assert len(_id_lookups(seen, "der_devices", "der_id")) == 1, seen


def test_a_meter_batch_looks_its_ids_up_once(api):
    app, c, admin = api
    u = uuid.uuid4().hex[:6]
    rows = [{"meter_id": f"m{k}-{u}", "bus": f"b{k}"} for k in range(3)]
    assert c.post("/v1/meters/batch", headers=admin,
                  json={"meters": rows[:1]}).status_code == 201
    with _statements(app.state.engine) as seen:
        r = c.post("/v1/meters/batch", headers=admin, json={"meters": rows})
    assert r.status_code == 201, r.text
    assert r.json() == {"created": [f"m1-{u}", f"m2-{u}"], "existing": [f"m0-{u}"]}
    assert len(_id_lookups(seen, "meters", "meter_id")) == 1, seen
