"""Creates of the same new key at once answer as they would one after the other.

``POST /v1/feeders`` read whether the feeder was registered, then inserted it; so did
``POST /v1/adms/messages`` and ``/v1/operator/overrides`` with their request id
(``adms-<message_id>``, ``op-<override_id>``), and a retrain recording a model version
(``forecast_models`` (name, version)). Two requests that both read "not there" both
inserted; the second insert broke the key and the database's IntegrityError was answered
500. The sequential answers: a feeder id already registered is 409 problem+json naming it;
an ADMS message or override resent is 200 (same content) or 409 (other content); a model
version recorded again refreshes the record (``created`` False).

The race is made deterministic by a barrier right after each request's key lookup (an
engine event on the app's engine; :mod:`tests.integration.test_registry_concurrent_ids`):
every request has read "not there" before any inserts.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from derms.api.app import create_app
from derms.config import get_settings
from derms.store.db import make_engine
from derms.store.forecasts import save_model_record
from derms.store.models import AuditEntry, ControlRequestRecord, Feeder, ForecastModel
from tests.integration.conftest import mint_token
from tests.integration.test_registry_concurrent_ids import (
    _at_once,
    _both_read_first,
    _statements_meet,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def api(db_url):
    app = create_app(get_settings(database_url=db_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client, mint_token(db_url, "admin"), mint_token(db_url, "operate")


def _count(app, model, *where) -> int:
    with app.state.sessions() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def _codes(answers: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in answers)


def _problems(answers: list[httpx.Response], status: int) -> list[dict]:
    """The answers of ``status``, each a problem+json document."""
    out = [r for r in answers if r.status_code == status]
    assert all(r.headers["content-type"] == "application/problem+json" for r in out)
    return [r.json() for r in out]


@pytest.mark.parametrize("n,identical", [(2, True), (2, False), (4, True)])
def test_the_same_new_feeder_created_at_once(api, n, identical):
    """One 201, the others 409 naming the id; one row, one audit entry, the winner's."""
    app, c, admin, _ = api
    fid = f"f-{uuid.uuid4().hex[:6]}"
    bodies = [{"feeder_id": fid, "name": "head" if identical else f"name {k}"}
              for k in range(n)]
    with _both_read_first(app.state.engine, "feeders", "feeder_id", n=n) as met:
        answers = _at_once(*(lambda b=b: c.post("/v1/feeders", headers=admin, json=b)
                             for b in bodies))
    assert met == [True] * n
    assert _codes(answers) == [201] + [409] * (n - 1), [r.text for r in answers]
    assert {p["detail"] for p in _problems(answers, 409)} == {f"feeder {fid!r} exists"}
    won = next(r for r in answers if r.status_code == 201).json()
    with app.state.sessions() as s:
        assert s.get(Feeder, fid).name == won["name"]
    assert _count(app, AuditEntry, AuditEntry.entity_id == fid) == 1


@pytest.fixture
def feeder_device(api):
    """A feeder and a battery on it (the targets of the messages below)."""
    _app, c, admin, _ = api
    u = uuid.uuid4().hex[:6]
    fid, der = f"f-{u}", f"bat-{u}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    r = c.post("/v1/devices", headers=admin, json={
        "der_id": der, "site_id": f"s-{u}", "feeder_id": fid, "der_type": "battery",
        "s_max_kva": 10, "p_gen_max_kw": 8, "p_charge_max_kw": 8})
    assert r.status_code == 201, r.text
    return fid, der


def _post_at_once(app, c, path: str, headers: dict, bodies: list[dict]) -> list[httpx.Response]:
    with _both_read_first(app.state.engine, "control_requests", "request_id") as met:
        answers = _at_once(*(lambda b=b: c.post(path, headers=headers, json=b)
                             for b in bodies))
    assert met == [True, True]
    return answers


def _one_request_stored(app, request_id: str) -> None:
    assert _count(app, ControlRequestRecord, ControlRequestRecord.request_id == request_id) == 1
    assert _count(app, AuditEntry, AuditEntry.entity_id == request_id) == 1


@pytest.mark.parametrize("identical", [True, False])
def test_the_same_new_adms_message_at_once(api, feeder_device, identical):
    """Same content: 201 and 200 (a resend); other content: 201 and 409."""
    app, c, _, operator = api
    fid, _der = feeder_device
    mid = f"m-{uuid.uuid4().hex[:6]}"
    expiry = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    bodies = [{"message_id": mid, "type": "limit_export", "limit_kw": kw, "expiry": expiry,
               "scope": {"kind": "feeder", "feeder_id": fid}}
              for kw in ((120, 120) if identical else (120, 90))]
    answers = _post_at_once(app, c, "/v1/adms/messages", operator, bodies)
    if identical:
        assert _codes(answers) == [200, 201], [r.text for r in answers]
        assert [r.json()["created"] for r in sorted(answers, key=lambda r: r.status_code)] \
            == [False, True]
    else:
        assert _codes(answers) == [201, 409], [r.text for r in answers]
        assert "exists with other content" in _problems(answers, 409)[0]["detail"]
    _one_request_stored(app, f"adms-{mid}")


def test_the_same_new_operator_override_at_once(api, feeder_device):
    app, c, _, operator = api
    _fid, der = feeder_device
    oid = f"o-{uuid.uuid4().hex[:6]}"
    body = {"override_id": oid, "scope": {"kind": "device", "der_id": der}, "value_kw": 3.0,
            "expiry": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    answers = _post_at_once(app, c, "/v1/operator/overrides", operator, [body, body])
    assert _codes(answers) == [200, 201], [r.text for r in answers]
    _one_request_stored(app, f"op-{oid}")


def _both_insert_together(engine, table: str):
    """Hold the first two inserts into ``table`` until both are about to run (whatever each
    read before)."""
    head = f"INSERT INTO {table.upper()}"
    return _statements_meet(engine, lambda s: s.lstrip().upper().startswith(head),
                            when="before_cursor_execute")


def test_the_same_model_version_recorded_at_once(db_url):
    """Two retrains recording the same (name, version): one creates it, the other refreshes
    it (``created`` False), as one after the other; one row."""
    engine = make_engine(db_url)
    name = f"load-{uuid.uuid4().hex[:6]}"
    out: list[tuple | BaseException | None] = [None, None]

    def record(k: int) -> None:
        try:
            out[k] = save_model_record(engine, name=name, kind="load", version="v1",
                                       trained_at=T0 + timedelta(minutes=k), train_end=T0,
                                       n_series=1, path="/nowhere")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            out[k] = exc

    try:
        with _both_insert_together(engine, "forecast_models") as met:
            threads = [threading.Thread(target=record, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert met == [True, True]
        assert all(isinstance(o, tuple) for o in out), out
        assert sorted(o[1] for o in out) == [False, True]  # type: ignore[index]
        assert out[0][0].id == out[1][0].id  # type: ignore[index]
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(ForecastModel).where(
                ForecastModel.name == name)) == 1
    finally:
        engine.dispose()
