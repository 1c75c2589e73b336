"""The ADMS interface end to end: the real app (SQLite and PostgreSQL), the real Mosquitto
broker at 127.0.0.1:1883, the arbiter's precedence and expiry, restart, bad input."""

from __future__ import annotations

import json
import queue
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from derms.api.app import create_app
from derms.config import get_settings
from derms.control import persistence
from derms.control.adms_mqtt import AdmsMqtt
from derms.control.requests import CommandKind, ControlRequest, Scope, Source
from derms.store.audit import read_audit
from derms.store.db import make_engine, make_session_factory
from derms.store.models import ControlRequestRecord, TopologyEvent
from tests.integration.conftest import mint_token

paho = pytest.importorskip("paho.mqtt.client")
H = timedelta(hours=1)


def _broker_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def api(db_url):
    client = TestClient(create_app(get_settings(database_url=db_url)),
                        raise_server_exceptions=False)
    client.admin, client.reader = mint_token(db_url, "admin"), mint_token(db_url, "read")
    client.operator = mint_token(db_url, "operate")
    client.db_url = db_url
    return client


@pytest.fixture
def grid(api):
    """A feeder with a battery on bus 671 (site = connection point) and a PV on bus 680."""
    u = uuid.uuid4().hex[:8]
    ids = {"u": u, "f": f"f-{u}", "bat": f"bat-{u}", "pv": f"pv-{u}", "site": f"site-{u}"}
    assert api.post("/v1/feeders", headers=api.admin, json={"feeder_id": ids["f"]}).status_code == 201
    for der, site, bus, kind in ((ids["bat"], ids["site"], "671", "battery"),
                                 (ids["pv"], f"site2-{u}", "680", "pv")):
        r = api.post("/v1/devices", headers=api.admin, json={
            "der_id": der, "site_id": site, "feeder_id": ids["f"], "bus": bus,
            "der_type": kind, "s_max_kva": 10, "p_gen_max_kw": 8, "p_charge_max_kw": 8})
        assert r.status_code == 201, r.text
    return ids


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _decision(api, der_id, t=None):
    params = {"t": _iso(t)} if t else None
    r = api.get(f"/v1/control/decisions/{der_id}", headers=api.reader, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _rows(db_url, u: str) -> tuple[int, int]:
    """Control requests and topology events stored for the grid with suffix ``u``."""
    eng = make_engine(db_url)
    with eng.connect() as c:
        n_req = c.scalar(select(func.count()).select_from(ControlRequestRecord).where(
            ControlRequestRecord.request_id.contains(u)
            | ControlRequestRecord.feeder_id.contains(u) | ControlRequestRecord.der_id.contains(u)))
        n_top = c.scalar(select(func.count()).select_from(TopologyEvent).where(
            TopologyEvent.feeder_id.contains(u)))
    eng.dispose()
    return n_req, n_top


def _optimisation_setpoint(db_url, der_id: str, now: datetime, value_kw: float) -> str:
    """The optimiser's path (a library call; no REST route writes optimisation setpoints)."""
    rid = f"opt-{uuid.uuid4().hex[:12]}"
    eng = make_engine(db_url)
    with make_session_factory(eng).begin() as s:
        persistence.submit(s, ControlRequest(rid, Source.OPTIMISATION,
                                             CommandKind.OPTIMISATION_SETPOINT,
                                             Scope.device(der_id), now - 60 * timedelta(seconds=1),
                                             now + 3 * H, value_kw=value_kw, issued_at=now),
                           actor="optimiser")
    eng.dispose()
    return rid


class Bus:
    """A publisher that also listens to the results and errors of one sender."""

    def __init__(self, root: str, sender: str) -> None:
        self.prefix = f"{root}/adms/{sender}"
        self.results: queue.Queue = queue.Queue()
        self.errors: queue.Queue = queue.Queue()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2,
                             client_id=f"adms-pub-{uuid.uuid4().hex[:8]}")
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", 1883)
        self.c.loop_start()
        self.c.subscribe([(self.prefix + "/results", 1), (self.prefix + "/errors", 1)])
        time.sleep(0.3)

    def _on(self, _c, _u, m) -> None:
        body = json.loads(m.payload)
        if m.topic.endswith("/results"):
            self.results.put(body)
        elif m.topic.endswith("/errors"):
            self.errors.put(body)

    def send(self, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.c.publish(self.prefix + "/requests", data, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def bus(api):
    if not _broker_up():
        pytest.skip("Mosquitto not running on :1883")
    from tests.integration.test_crash_recovery import drop_session

    client_id = f"derms-adms-{uuid.uuid4().hex[:8]}"
    root = f"test/{client_id}"  # own topics: other tests may use the broker at the same time
    engine = make_engine(api.db_url)
    switched: list[str] = []
    sub = AdmsMqtt(make_session_factory(engine), client_id=client_id, topic_root=root,
                   on_topology=switched.append)
    sub.start()
    pub = Bus(root, "adms1")
    pub.sub, pub.switched = sub, switched
    yield pub
    pub.close()
    sub.stop()
    drop_session(client_id)
    engine.dispose()


def test_adms_block_over_mqtt_overrides_operator_which_overrides_optimisation(api, grid, bus):
    now = datetime.now(UTC)
    bat, u = grid["bat"], grid["u"]
    opt = _optimisation_setpoint(api.db_url, bat, now, -6.0)
    assert _decision(api, bat)["setpoint_by"] == opt

    r = api.post("/v1/operator/overrides", headers=api.operator, json={
        "override_id": f"o-{u}", "scope": {"kind": "device", "der_id": bat},
        "value_kw": 3.0, "expiry": _iso(now + 2 * H), "reason": "customer test"})
    assert r.status_code == 201, r.text
    op = r.json()["requests"][0]["request_id"]
    assert op == f"op-o-{u}"
    d = _decision(api, bat)
    assert (d["setpoint_kw"], d["setpoint_by"]) == (3.0, op)
    assert {x["request_id"]: x["outcome"] for x in d["rulings"]}[opt] == "overridden"

    block = {"message_id": f"m-{u}", "type": "block_dispatch", "reason": "fault F12",
             "scope": {"kind": "section", "feeder_id": grid["f"], "section_id": "zone-2",
                       "buses": ["671", "675"]}, "expiry": _iso(now + H)}
    bus.send(block)
    res = bus.results.get(timeout=10)
    assert res["status"] == "accepted" and res["request_ids"] == [f"adms-m-{u}"]
    d = _decision(api, bat)
    assert d["blocked"] and d["blocked_by"] == f"adms-m-{u}" and d["setpoint_kw"] is None
    why = {x["request_id"]: (x["outcome"], x["by"]) for x in d["rulings"]}
    assert why[op] == ("overridden", f"adms-m-{u}") and why[opt] == ("overridden", f"adms-m-{u}")
    assert not _decision(api, grid["pv"])["blocked"]  # bus 680 is outside the section

    bus.send(block)  # a redelivery (or a resend) of the same message: nothing new
    assert bus.results.get(timeout=10)["status"] == "duplicate"
    assert _rows(api.db_url, u)[0] == 3  # optimisation, operator, ADMS: one row each

    # expiry restores the next level: the operator after the block, then the optimiser
    assert _decision(api, bat, now + 61 * timedelta(minutes=1))["setpoint_by"] == op
    assert _decision(api, bat, now + 121 * timedelta(minutes=1))["setpoint_by"] == opt

    # restart: a new app on the same database gives the same decision
    again = TestClient(create_app(get_settings(database_url=api.db_url)))
    r = again.get(f"/v1/control/decisions/{bat}", headers=api.reader)
    assert r.json()["blocked_by"] == f"adms-m-{u}"

    # the ADMS withdraws its block (and may resend the withdrawal): the operator is back
    bus.send({"message_id": f"w-{u}", "type": "withdraw", "request_id": f"adms-m-{u}"})
    assert bus.results.get(timeout=10)["withdrawn"] == [f"adms-m-{u}"]
    bus.send({"message_id": f"w-{u}", "type": "withdraw", "request_id": f"adms-m-{u}"})
    assert bus.results.get(timeout=10)["status"] == "duplicate"
    assert _decision(api, bat)["setpoint_by"] == op
    # the ADMS path cannot withdraw an operator's override
    bus.send({"message_id": f"w2-{u}", "type": "withdraw", "request_id": op})
    assert "may withdraw only adms" in bus.errors.get(timeout=10)["detail"]

    eng = make_engine(api.db_url)
    with make_session_factory(eng)() as s:
        log = [(e.action, e.actor) for e in read_audit(s, entity="control_request",
                                                        entity_id=f"adms-m-{u}")]
    eng.dispose()
    assert log == [("submit", "mqtt:adms1"), ("withdraw", "mqtt:adms1")]


def test_switching_becomes_topology_events_and_an_abnormal_configuration(api, grid, bus):
    now = datetime.now(UTC)
    f, u = grid["f"], grid["u"]
    msg = {"message_id": f"sw-{u}", "type": "switching", "feeder_id": f, "t": _iso(now),
           "switches": [{"switch": "SW1", "state": "open"}, {"switch": "sw7", "state": "closed"}],
           "expiry": _iso(now + H), "reason": "fault isolation"}
    bus.send(msg)
    res = bus.results.get(timeout=10)
    assert res["status"] == "accepted" and len(res["topology_event_ids"]) == 2
    assert bus.switched == [f]
    bus.send(msg)
    assert bus.results.get(timeout=10)["status"] == "duplicate"
    assert _rows(api.db_url, u) == (1, 2)
    eng = make_engine(api.db_url)
    with eng.connect() as c:
        states = dict(c.execute(select(TopologyEvent.switch, TopologyEvent.state)
                                .where(TopologyEvent.feeder_id == f)).all())
    eng.dispose()
    assert states == {"sw1": "open", "sw7": "closed"}
    assert _decision(api, grid["bat"])["abnormal_by"] == [f"adms-sw-{u}"]


BAD_MESSAGES = [
    (b"{not json", "invalid"),
    ({"message_id": "x1", "type": "open_switch", "switch": "sw1"}, "type"),
    ({"message_id": "x2", "type": "set_regulator_tap", "regulator": "reg1", "tap": 3}, "type"),
    ({"message_id": "x3", "type": "capacitor_off", "capacitor": "c1"}, "type"),
    ({"message_id": "x4", "type": "block_dispatch", "scope": {"kind": "feeder", "feeder_id": "F"},
      "expiry": "2030-01-01T00:00:00"}, "timezone"),
    ({"message_id": "x5", "type": "block_dispatch", "scope": {"kind": "feeder", "feeder_id": "F"}},
     "expiry"),
    ({"type": "block_dispatch", "scope": {"kind": "feeder", "feeder_id": "F"},
      "expiry": "2099-01-01T00:00:00Z"}, "message_id is required"),
    ({"message_id": "x6", "type": "block_dispatch", "scope": {"kind": "feeder", "feeder_id": "F"},
      "expiry": "2001-01-01T00:00:00Z"}, "already passed"),
    ({"message_id": "x7", "type": "limit_export", "limit_kw": -5,
      "scope": {"kind": "feeder", "feeder_id": "F"}, "expiry": "2099-01-01T00:00:00Z"}, "limit_kw"),
    ({"message_id": "x8", "type": "block_dispatch", "scope": {"kind": "feeder", "feeder_id": "nope"},
      "expiry": "2099-01-01T00:00:00Z"}, "unknown feeder"),
    ({"message_id": "x9", "type": "block_dispatch", "scope": {"kind": "regulator", "feeder_id": "F"},
      "expiry": "2099-01-01T00:00:00Z"}, "scope.kind"),
    ({"message_id": "x10", "type": "block_dispatch", "start": "2099-01-02T00:00:00Z",
      "scope": {"kind": "feeder", "feeder_id": "F"}, "expiry": "2099-01-01T00:00:00Z"},
     "is not after start"),
    ({"message_id": "x11", "type": "switching", "feeder_id": "F", "t": "2026-01-01T00:00:00Z",
      "switches": [{"switch": "sw1", "state": "toggle"}]}, "state"),
]


def _fill(payload, f):
    return payload if isinstance(payload, bytes) else json.loads(json.dumps(payload).replace(
        '"F"', json.dumps(f)))


def test_bad_messages_on_the_bus_are_rejected_and_nothing_is_stored(api, grid, bus):
    for payload, _ in BAD_MESSAGES:
        bus.send(_fill(payload, grid["f"]))
    errors = [bus.errors.get(timeout=10) for _ in BAD_MESSAGES]
    for (payload, expected), err in zip(BAD_MESSAGES, errors, strict=True):
        assert expected in err["detail"], (expected, err)
        if isinstance(payload, dict):  # named back even when the message is invalid
            assert err["message_id"] == payload.get("message_id")
    assert bus.sub.stats.rejected == len(BAD_MESSAGES) and bus.sub.stats.accepted == 0
    assert _rows(api.db_url, grid["u"]) == (0, 0)
    assert bus.results.empty()


@pytest.mark.parametrize("payload, expected", [p for p in BAD_MESSAGES if not isinstance(p[0], bytes)
                                               and "message_id is required" not in p[1]])
def test_bad_messages_over_rest_are_problems_and_nothing_is_stored(api, grid, payload, expected):
    r = api.post("/v1/adms/messages", headers=api.operator, json=_fill(payload, grid["f"]))
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert expected in body["detail"] or any(
        expected in e["field"] or expected in e["detail"] for e in body.get("errors", [])), body
    assert _rows(api.db_url, grid["u"]) == (0, 0)


def test_rest_adms_operator_scopes_conflicts_and_withdrawal(api, grid):
    now, u, f, bat = datetime.now(UTC), grid["u"], grid["f"], grid["bat"]
    limit = {"message_id": f"l-{u}", "type": "limit_export", "limit_kw": 120,
             "scope": {"kind": "feeder", "feeder_id": f}, "expiry": _iso(now + H)}
    assert api.post("/v1/adms/messages", headers=api.reader, json=limit).status_code == 403
    assert api.post("/v1/adms/messages", json=limit).status_code == 401
    r = api.post("/v1/adms/messages", headers=api.operator, json=limit)
    assert r.status_code == 201 and r.json()["requests"][0]["value_kw"] == 120.0
    assert api.post("/v1/adms/messages", headers=api.operator, json=limit).status_code == 200
    r = api.post("/v1/adms/messages", headers=api.operator, json={**limit, "limit_kw": 90})
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    d = _decision(api, bat)
    assert d["limits"] == [{"kind": "limit_export", "target": f"feeder:{f}", "scope_kind": "feeder",
                            "value_kw": 120.0, "request_id": f"adms-l-{u}", "source": "adms"}]
    got = api.get(f"/v1/control/requests/adms-l-{u}", headers=api.reader).json()
    assert got["actor"].startswith("api:") and got["scope"] == {"kind": "feeder", "feeder_id": f}
    listed = api.get("/v1/control/requests?open=true&source=adms", headers=api.reader).json()
    assert f"adms-l-{u}" in {x["request_id"] for x in listed["items"]}

    # operator overrides: validation, the source's own withdrawal path
    bad = [{"scope": {"kind": "feeder", "feeder_id": f}, "value_kw": 1, "expiry": _iso(now + H)},
           {"scope": {"kind": "device", "der_id": bat}, "value_kw": 1,
            "expiry": _iso(now + H)[:-1]},  # naive
           {"scope": {"kind": "device", "der_id": bat}, "expiry": _iso(now + H)},
           {"scope": {"kind": "device", "der_id": "nope"}, "value_kw": 1, "expiry": _iso(now + H)},
           {"kind": "optimisation_setpoint", "scope": {"kind": "device", "der_id": bat},
            "value_kw": 1, "expiry": _iso(now + H)},
           # beyond the device's 10 kVA (1e308 was stored and "applied")
           {"scope": {"kind": "device", "der_id": bat}, "value_kw": 1e308,
            "expiry": _iso(now + H)},
           {"scope": {"kind": "device", "der_id": bat}, "value_kw": -10.5,
            "expiry": _iso(now + H)}]
    for body in bad:
        r = api.post("/v1/operator/overrides", headers=api.operator, json=body)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    r = api.post("/v1/operator/overrides", headers=api.operator, json={
        "override_id": f"ov-{u}", "scope": {"kind": "device", "der_id": bat}, "value_kw": -2.5,
        "expiry": _iso(now + H)})
    assert r.status_code == 201
    assert api.post(f"/v1/operator/overrides/adms-l-{u}/withdraw",
                    headers=api.operator).status_code == 409
    assert api.post("/v1/operator/overrides/nope/withdraw", headers=api.operator).status_code == 404
    r = api.post(f"/v1/operator/overrides/op-ov-{u}/withdraw", headers=api.operator,
                 json={"reason": "test over"})
    assert r.status_code == 200 and r.json()["withdrawn"] == [f"op-ov-{u}"]
    assert _decision(api, bat)["setpoint_kw"] is None
    assert api.get("/v1/control/requests/nope", headers=api.reader).status_code == 404
    assert api.get("/v1/control/decisions/nope", headers=api.reader).status_code == 404
    r = api.get(f"/v1/control/decisions/{bat}", headers=api.reader, params={"t": "2026-01-01T00:00"})
    assert r.status_code == 422  # a naive time


def test_rest_switching_notifies_the_monitor(api, grid):
    class Recorder:  # stands in for the MonitorProcess: records the notifications it gets
        def __init__(self):
            self.feeders = []

        def notify_topology_change(self, feeder_id):
            self.feeders.append(feeder_id)

    rec = Recorder()
    api.app.state.monitor = rec
    try:
        r = api.post("/v1/adms/messages", headers=api.operator, json={
            "type": "switching", "feeder_id": grid["f"], "t": _iso(datetime.now(UTC)),
            "switches": [{"switch": "671692", "state": "open"}]})
    finally:
        api.app.state.monitor = None
    assert r.status_code == 201 and rec.feeders == [grid["f"]]
    assert r.json()["requests"] == []  # no expiry: switch states only


def test_a_section_must_name_buses_of_the_feeders_model(api, grid):
    """A block for a section whose buses the feeder's model lacks was stored (201) and
    matched nothing; with a model version registered, it is a 422 naming them."""
    f, u = grid["f"], grid["u"]
    now = datetime.now(UTC)
    block = {"type": "block_dispatch", "expiry": _iso(now + timedelta(hours=1)),
             "scope": {"kind": "section", "feeder_id": f, "section_id": "zone-9",
                       "buses": ["671", "nosuchbus"]}}
    # no model version yet: nothing to check against
    r = api.post("/v1/adms/messages", headers=api.operator,
                 json={**block, "message_id": f"s0-{u}"})
    assert r.status_code == 201, r.text
    r = api.post(f"/v1/feeders/{f}/models", headers=api.admin, json={"source_uri": "ieee13"})
    assert r.status_code == 201, r.text
    r = api.post("/v1/adms/messages", headers=api.operator,
                 json={**block, "message_id": f"s1-{u}"})
    assert r.status_code == 422 and "nosuchbus" in r.json()["detail"], r.text
    good = {**block["scope"], "buses": ["671", "675.1.2.3"]}
    r = api.post("/v1/adms/messages", headers=api.operator,
                 json={**block, "scope": good, "message_id": f"s2-{u}"})
    assert r.status_code == 201, r.text
