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
    assert api.head("/health").status_code == 200 == api.head("/ready").status_code  # probes
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
    # a 500 kW generator on a 5 kVA inverter was registered (independent test)
    r = api.post("/v1/devices", headers=api.admin, json={
        "der_id": "x-big", "site_id": "s", "der_type": "pv", "s_max_kva": 5,
        "p_gen_max_kw": 500})
    assert r.status_code == 422, r.text
    assert "p_gen_max_kw 500 is beyond s_max_kva 5" in r.json()["errors"][0]["detail"]
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


def _children(pid: int) -> set[int]:
    """Descendant process ids of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_sigterm_stops_serve_and_its_monitor_child(tmp_path):
    """uvicorn re-raises the SIGTERM it handled; with the default handler the process died
    before its cleanup and the monitoring child (its own OpenDSS engines, ≈ 300 MB and
    database sessions) was orphaned."""
    env = {**os.environ, "DERMS_DATA_DIR": str(tmp_path)}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "derms.cli.main", "serve", "--port",
                             str(port), "--no-mqtt", "--monitor-period-s", "3600"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        kids: set[int] = set()
        while time.monotonic() < deadline and not kids:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    kids = _children(proc.pid)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert kids, "no monitoring child process"
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{k}") for k in kids):
            time.sleep(0.2)
        left = [k for k in kids if os.path.exists(f"/proc/{k}")]
        assert not left, f"orphaned: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in _children(proc.pid):
            os.kill(k, 9)


_JSON = {"Content-Type": "application/json"}


def _row(dev, **kw):
    return {"series": dev, "quantity": "p", "unit": "kW", "t": "2026-06-02T00:15:00Z",
            "value": 7, **kw}


@pytest.mark.parametrize("body,field", [
    # a null or absent quantity used to take another row's quantity and unit factor (a
    # 7 kW row stored as soc 0.07); alone in a batch it was a 500
    (lambda d: [_row(d, quantity="soc", unit="%"), _row(d, quantity=None)], "quantity"),
    (lambda d: [_row(d, quantity="soc", unit="%"),
                {k: v for k, v in _row(d).items() if k != "quantity"}], "quantity"),
    (lambda d: [_row(d, quantity=None)], "quantity"),
    (lambda d: [_row(d, value=True)], "value"),                      # booleans are no numbers
])
def test_rows_without_quantity_or_with_booleans_are_refused(api, body, field):
    dev = f"bat-{uuid.uuid4().hex[:6]}"
    _device(api, dev)
    r = api.post("/v1/readings", headers=api.operator, json=body(dev))
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field
    for q in ("p_kw", "soc_frac", "v_v"):
        got = api.get("/v1/readings", headers=api.reader, params={
            "series": dev, "quantity": q, "start": "2026-06-01T00:00:00Z",
            "end": "2026-06-03T00:00:00Z"}).json()
        assert got["rows"] == 0


def test_bodies_that_were_500s_are_4xx_problems(api):
    dev = f"bat-{uuid.uuid4().hex[:6]}"
    _device(api, dev)
    bodies = [
        '[{{"series":"{}","quantity":"p","unit":"kW","t":"2026-06-02T00:15:00Z","value":{}}}]'.format(dev, "9" * 400),                                          # OverflowError
        '[{{"series":"{}","quantity":"p","unit":"kW","t":"2026-06-02T00:15:00Z","value":1,'
        '"quality":{}}}]'.format(dev, "9" * 400),
        json.dumps([_row(dev, device=dev)]),                          # two aliases
        json.dumps([_row(dev, timestamp="2026-06-02T00:15:00Z")]),
        "[" * 60_000 + "]" * 60_000,                                  # RecursionError
        ('[{"series":"inv-\\ud800","quantity":"p","unit":"kW","t":"2026-06-02T00:15:00Z",'
        '"value":1}]'),                                                # lone surrogate
    ]
    for body in bodies:
        r = api.post("/v1/readings", headers={**api.operator, **_JSON}, content=body)
        assert r.status_code == 422, (body[:80], r.status_code, r.text[:200])
        assert r.headers["content-type"] == "application/problem+json"
    raw = (b'[{"series":"dev-\xed\xa0\x80","quantity":"p","unit":"kW",'
           b'"t":"2026-06-02T00:15:00Z","value":1}]')   # a surrogate encoded as UTF-8 bytes
    r = api.post("/v1/readings", headers={**api.operator, **_JSON}, content=raw)
    assert r.status_code == 422, (r.status_code, r.text[:200])
    csv_h = {**api.operator, "Content-Type": "text/csv"}
    for text in (f"series,quantity,unit,t,value\n{dev},p,kW,2026-06-02T00:15:00Z,1,5\n",
                 f"series,series,quantity,unit,t,value\n{dev},{dev},p,kW,2026-06-02T00:15:00Z,1\n"):
        r = api.post("/v1/readings", headers=csv_h, content=text)
        assert r.status_code == 422 and "header" in r.json()["detail"], r.text
    # one reading object is accepted, as the MQTT topic docs always said
    r = api.post("/v1/readings", headers=api.operator, json=_row(dev))
    assert r.status_code == 200 and r.json()["accepted"] == 1


def test_queries_with_out_of_range_values_are_422(api):
    dev = f"bat-{uuid.uuid4().hex[:6]}"
    _device(api, dev)
    q = {"series": dev, "quantity": "p_kw", "start": "2026-06-01T00:00:00Z",
         "end": "2026-06-03T00:00:00Z"}
    for extra in ({"start": "0001-01-01T00:00:00+05:00"}, {"end": "9999-12-31T23:00:00-05:00"},
                  {"bucket": "99999999999999999999h"}, {"bucket": "1000000000h"},
                  {"quantity": "p"}, {"quantity": "nonsense"}):
        r = api.get("/v1/readings", headers=api.reader, params={**q, **extra})
        assert r.status_code == 422, (extra, r.status_code, r.text[:200])
    for path in ("/v1/devices", "/v1/feeders"):
        r = api.get(path, headers=api.reader, params={"offset": 2**63})
        assert r.status_code == 422, r.text
        assert api.get(path, headers=api.reader, params={"offset": 2**62}).json()["items"] == []
    r = api.get(f"/v1/devices/{dev}%00", headers=api.reader)
    assert r.status_code == 422 and "NUL" in r.json()["detail"]


def test_registry_refuses_what_the_database_cannot_hold(api):
    base = {"site_id": "s-reg", "der_type": "pv", "s_max_kva": 5}
    bad = [{"der_id": "x1", **base, "s_max_kva": float("inf")},
           {"der_id": "x2", **base, "e_max_kwh": float("inf")},
           {"der_id": "x3", **base, "q_min_kvar": float("-inf")},
           {"der_id": "x4", **base, "bus": "b" * 65},
           {"der_id": "x5", **base, "owner": "o" * 201},
           {"der_id": "x\u00006", **base},
           {"der_id": " x7", **base},                       # no leading/trailing blanks
           {"der_id": "x8", **base, "site_id": "s\u0000"}]
    for body in bad:
        r = api.post("/v1/devices", headers={**api.admin, **_JSON},
                     content=json.dumps(body, allow_nan=True))
        assert r.status_code == 422, (body, r.status_code, r.text[:200])
    r = api.post("/v1/feeders", headers=api.admin, json={"feeder_id": "f-x", "name": "n" * 201})
    assert r.status_code == 422
    r = api.post("/v1/meters", headers=api.admin, json={"meter_id": "m\u0000"})
    assert r.status_code == 422


def test_device_naming_another_feeder_than_its_site_is_409(api):
    for f in ("fa", "fb"):
        api.post("/v1/feeders", headers=api.admin, json={"feeder_id": f"{f}-{id(api)}"})
    fa, fb = f"fa-{id(api)}", f"fb-{id(api)}"
    site = f"site-{uuid.uuid4().hex[:6]}"
    dev = {"site_id": site, "der_type": "pv", "s_max_kva": 5}
    r = api.post("/v1/devices", headers=api.admin, json={"der_id": site + "a", "feeder_id": fa,
                                                          **dev})
    assert r.status_code == 201 and r.json()["feeder_id"] == fa
    r = api.post("/v1/devices", headers=api.admin, json={"der_id": site + "b", "feeder_id": fb,
                                                          **dev})
    assert r.status_code == 409 and fa in r.json()["detail"]
    r = api.post("/v1/devices", headers=api.admin, json={"der_id": site + "c", **dev})
    assert r.status_code == 201 and r.json()["feeder_id"] == fa   # the stored value
    r = api.post("/v1/devices/batch", headers=api.admin, json={"devices": [
        {"der_id": site + "d", "feeder_id": fb, **dev}]})
    assert r.status_code == 409


def test_anonymous_writes_and_oversized_bodies_stop_before_the_body_is_read(api):
    r = api.post("/v1/devices", content=b"{{{", headers=_JSON)
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert "www-authenticate" in r.headers
    big = b"[" + b" " * 300_000 + b"]"                 # above this app's 200,000-byte limit
    r = api.post("/v1/devices/batch", headers={**api.admin, **_JSON}, content=big)
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"

    def chunks():                                      # no Content-Length: streamed
        for _ in range(30):
            yield b" " * 10_000
    r = api.post("/v1/devices/batch", headers={**api.admin, **_JSON}, content=chunks())
    assert r.status_code == 413, r.text


def test_serve_refuses_bad_and_busy_ports_before_starting(tmp_path):
    """--port 99999 was an OverflowError traceback; a port in use (or the 2030.5 port
    equal to the API's) was uvicorn's exit 3 after the loops had started."""
    env = {**os.environ, "DERMS_DATA_DIR": str(tmp_path)}
    base = [sys.executable, "-m", "derms.cli.main", "serve", "--no-mqtt"]
    res = subprocess.run([*base, "--port", "99999"], env=env, capture_output=True, text=True,
                         check=False,
                         timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([*base, "--port", str(port)], env=env, capture_output=True,
                             check=False,
                             text=True, timeout=60)
    assert res.returncode == 2 and "--port" in res.stderr and "Traceback" not in res.stderr
    for bad in ("nan", "-1", "1e-9"):  # silently off / a busy loop before
        res = subprocess.run([*base, "--monitor-period-s", bad], env=env, capture_output=True,
                             check=False, text=True, timeout=60)
        assert res.returncode == 2 and "--monitor-period-s" in res.stderr, bad


def test_405_lists_every_method_of_the_path(api):
    """A path served by a GET and a POST route: a 405 names both (Starlette named only the
    first route's: "Allow: GET" on /v1/feeders)."""
    for method, path, allow in (("DELETE", "/v1/feeders", "GET, POST"),
                                ("PUT", "/v1/devices", "GET, POST"),
                                ("PATCH", "/health", "GET, HEAD")):
        r = api.request(method, path, headers=api.admin)
        assert r.status_code == 405, (method, path)
        assert r.headers["allow"] == allow, (method, path)
        assert r.headers["content-type"].startswith("application/problem+json")


def test_ids_with_a_slash_are_refused_they_could_never_be_addressed(api):
    """A feeder registered as "f/x" got 201, yet /v1/feeders/f%2Fx/models and /state are
    404 (the path is decoded before routing: /v1/feeders/f/x/models), so it could never
    get a model nor be monitored; a device "a/b" could never be read back."""
    r = api.post("/v1/feeders", headers=api.admin, json={"feeder_id": "f/x"})
    assert r.status_code == 422, r.text
    r = api.post("/v1/devices", headers=api.admin, json={
        "der_id": "a/b", "site_id": "s-slash", "der_type": "pv", "s_max_kva": 5})
    assert r.status_code == 422, r.text
    r = api.post("/v1/meters", headers=api.admin, json={"meter_id": "m/1"})
    assert r.status_code == 422, r.text
