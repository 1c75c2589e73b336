"""`derms serve --adms-mqtt` as a subprocess: an ADMS block over MQTT takes effect; the
server is killed, the ADMS withdraws the block while it is down, and after the restart the
broker's persistent session delivers the withdrawal (applied and audited once)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from derms.store.audit import read_audit
from derms.store.db import make_engine, make_session_factory

paho = pytest.importorskip("paho.mqtt.client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


class Served:
    def __init__(self, env: dict) -> None:
        self.env, self.port, self.proc = env, _free_port(), None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "derms.cli.main", "serve", "--port", str(self.port),
             "--no-mqtt", "--adms-mqtt"], env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

        def ready():
            try:
                return httpx.get(self.url("/ready"), timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        _wait(ready, 30)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def test_serve_takes_adms_messages_and_keeps_them_across_a_kill(db_url, tmp_path):
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
    except OSError:
        pytest.skip("Mosquitto not running on :1883")
    from tests.integration.conftest import mint_token
    from tests.integration.test_crash_recovery import drop_session

    u = uuid.uuid4().hex[:8]
    client_id = f"derms-srv-{u}"
    root = f"test/{client_id}"
    env = {**os.environ, "DERMS_DATABASE_URL": db_url, "DERMS_DATA_DIR": str(tmp_path),
           "DERMS_MQTT_CLIENT_ID": client_id, "DERMS_MQTT_TOPIC_ROOT": root}
    admin, reader = mint_token(db_url, "admin"), mint_token(db_url, "read")
    server = Served(env)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{u}")
    pub.connect("127.0.0.1", 1883)
    pub.loop_start()
    topic = f"{root}/adms/adms1/requests"
    try:
        server.start()
        feeder, dev = f"f-{u}", f"bat-{u}"
        assert httpx.post(server.url("/v1/feeders"), headers=admin,
                          json={"feeder_id": feeder}).status_code == 201
        assert httpx.post(server.url("/v1/devices"), headers=admin, json={
            "der_id": dev, "site_id": f"s-{u}", "feeder_id": feeder, "bus": "671",
            "der_type": "battery", "s_max_kva": 10}).status_code == 201

        def decision():
            return httpx.get(server.url(f"/v1/control/decisions/{dev}"), headers=reader).json()

        expiry = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        pub.publish(topic, json.dumps({
            "message_id": f"b-{u}", "type": "block_dispatch", "reason": "fault",
            "scope": {"kind": "feeder", "feeder_id": feeder}, "expiry": expiry}),
            qos=1).wait_for_publish(timeout=10)
        _wait(lambda: decision()["blocked"])

        server.kill()
        pub.publish(topic, json.dumps({"message_id": f"w-{u}", "type": "withdraw",
                                       "request_id": f"adms-b-{u}"}),
                    qos=1).wait_for_publish(timeout=10)
        server.start()  # same client id: the broker delivers the queued withdrawal
        _wait(lambda: not decision()["blocked"])
        assert decision()["blocked_by"] is None
    finally:
        server.stop()
        pub.loop_stop()
        pub.disconnect()
        drop_session(client_id + "-adms")
    eng = make_engine(db_url)
    with make_session_factory(eng)() as s:
        log = [e.action for e in sorted(read_audit(s, entity="control_request",
                                                   entity_id=f"adms-b-{u}"), key=lambda e: e.id)]
    eng.dispose()
    assert log == ["submit", "withdraw"]
