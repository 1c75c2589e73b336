"""The API on both backends (SQLite, real PostgreSQL): auth, registry, readings, problems."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from derms.api.app import create_app
from derms.config import get_settings
from tests.integration.conftest import mint_token

_mint = mint_token


@pytest.fixture(scope="module")
def api(db_url):
    client = TestClient(create_app(get_settings(database_url=db_url, max_body_bytes=200_000)),
                        raise_server_exceptions=False)
    client.admin, client.reader = _mint(db_url, "admin"), _mint(db_url, "read")
    client.operator = _mint(db_url, "operate")
    return client


def _device(api, der_id):
    r = api.post("/v1/devices", headers=api.admin, json={
        "der_id": der_id, "site_id": f"site-{der_id}", "der_type": "battery",
        "s_max_kva": 10, "p_gen_max_kw": 5, "p_charge_max_kw": 5, "e_max_kwh": 13.5})
    assert r.status_code == 201, r.text


def test_health_ready_metrics_need_no_token(api):
    assert api.get("/health").json() == {"status": "ok"}
    assert api.get("/ready").json()["status"] == "ready"
    assert "derms_http_requests_total" in api.get("/metrics").text
    assert api.get("/openapi.json").json()["info"]["title"] == "derms"


def test_registry_and_audit(api):
    dev = f"bat-{uuid.uuid4().hex[:6]}"
    _device(api, dev)
    assert api.get(f"/v1/devices/{dev}", headers=api.reader).json()["e_max_kwh"] == 13.5
    r = api.post("/v1/devices", headers=api.admin, json={"der_id": dev, "site_id": "s",
                                                          "der_type": "pv", "s_max_kva": 1})
    assert r.status_code == 409
    r = api.post("/v1/devices", headers=api.reader, json={})
    assert r.status_code == 403  # no writes without the scope
    r = api.post("/v1/devices", headers=api.admin, json={"der_id": "x", "site_id": "s",
                                                          "der_type": "toaster", "s_max_kva": -1})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    fields = {e["field"] for e in r.json()["errors"]}
    assert {"body.der_type", "body.s_max_kva"} <= fields
    page = api.get("/v1/devices?limit=1", headers=api.reader).json()
    assert page["limit"] == 1 and len(page["items"]) == 1 and page["total"] >= 1
    assert api.get("/v1/devices/nosuch", headers=api.reader).status_code == 404


def test_readings_roundtrip_idempotent_and_downsampled(api):
    dev = f"bat-{uuid.uuid4().hex[:6]}"
    _device(api, dev)
    rows = [{"series": dev, "quantity": "p", "unit": "kW",
             "t": f"2026-11-25T10:{m:02d}:00Z", "value": float(m)} for m in range(60)]
    r = api.post("/v1/readings", headers=api.operator, json=rows)
    assert r.json() == {"accepted": 60, "inserted": 60, "duplicates": 0}
    r = api.post("/v1/readings", headers=api.operator, json=rows)  # resent
    assert r.json() == {"accepted": 60, "inserted": 0, "duplicates": 60}
    csv = "series,quantity,unit,t,value\n" + f"{dev},soc,%,2026-11-25T10:00:00Z,50\n"
    r = api.post("/v1/readings", headers={**api.operator, "Content-Type": "text/csv"},
                 content=csv)
    assert r.json()["inserted"] == 1
    q = {"series": dev, "quantity": "p_kw", "start": "2026-11-25T10:00:00Z",
         "end": "2026-11-25T11:00:00Z"}
    got = api.get("/v1/readings", headers=api.reader, params=q).json()
    assert got["rows"] == 60 and got["value"][:3] == [0.0, 1.0, 2.0]
    got = api.get("/v1/readings", headers=api.reader, params={**q, "bucket": "15min"}).json()
    assert got["value"] == [7.0, 22.0, 37.0, 52.0] and got["n"] == [15, 15, 15, 15]


@pytest.mark.parametrize("mutate,status,fragment", [
    (lambda r: r.update(t="2026-11-25T10:00:00"), 422, "no zone"),
    (lambda r: r.update(value="NaN"), 422, "finite"),
    (lambda r: r.update(value=float("inf")), 422, "finite"),
    (lambda r: r.update(unit="furlongs"), 422, "unknown quantity/unit"),
    (lambda r: r.update(series="ghost-device"), 422, "unknown series"),
])
def test_bad_rows_are_422_with_row_detail_and_nothing_is_stored(api, mutate, status, fragment):
    dev = f"bat-{uuid.uuid4().hex[:6]}"
    _device(api, dev)
    rows = [{"series": dev, "quantity": "p", "unit": "kW", "t": "2026-11-25T12:00:00Z",
             "value": 1.0} for _ in range(1)]
    bad = dict(rows[0], t="2026-11-25T12:01:00Z")
    mutate(bad)
    body = json.dumps(rows + [bad], allow_nan=True)
    r = api.post("/v1/readings", headers={**api.operator, "Content-Type": "application/json"},
                 content=body)
    assert r.status_code == status
    problem = r.json()
    assert problem["accepted"] == 0 and problem["errors"][0]["row"] == 1
    assert fragment in problem["errors"][0]["detail"]
    q = {"series": dev, "quantity": "p_kw", "start": "2026-11-25T12:00:00Z",
         "end": "2026-11-25T13:00:00Z"}
    assert api.get("/v1/readings", headers=api.reader, params=q).json()["rows"] == 0


def test_whole_request_problems(api):
    op = api.operator
    assert api.post("/v1/readings", headers={**op, "Content-Type": "application/json"},
                    content=b"{oops").status_code == 422
    assert api.post("/v1/readings", headers={**op, "Content-Type": "application/xml"},
                    content=b"<a/>").status_code == 415
    big = b"[" + b" " * 300_000 + b"]"
    r = api.post("/v1/readings", headers={**op, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413
    assert api.post("/v1/readings", json=[]).status_code == 401
    r = api.get("/v1/readings", headers=api.reader, params={
        "series": "x", "quantity": "p_kw", "start": "2026-11-25T10:00:00",
        "end": "2026-11-25T11:00:00"})
    assert r.status_code == 422 and "time zone" in r.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_derms_serve_subprocess(tmp_path):
    env = {**os.environ, "DERMS_DATA_DIR": str(tmp_path)}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "derms.cli.main", "serve", "--port",
                             str(port), "--no-mqtt"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        token = subprocess.run([sys.executable, "-m", "derms.cli.main", "token", "create",
                                "--scope", "read"], env=env, capture_output=True, text=True,
                               check=True).stdout.strip()
        r = httpx.get(f"http://127.0.0.1:{port}/v1/devices",
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["total"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
