"""Kill -9 the served system during ingest; after a restart every acknowledged reading is
stored exactly once (REST: acknowledged = HTTP 200; MQTT: accepted by the broker at QoS 1,
the subscriber acknowledging only after its commit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import text

from derms.store.db import make_engine

N_DEV, PER_BATCH_S = 50, 10  # a batch: 50 devices x 10 seconds = 500 readings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, env: dict, mqtt: bool, client_id: str) -> None:
        self.env = {**env, "DERMS_MQTT_CLIENT_ID": client_id,
                    "DERMS_MQTT_TOPIC_ROOT": f"test/{client_id}"}
        self.port, self.mqtt, self.proc = _free_port(), mqtt, None

    def start(self) -> None:
        args = [sys.executable, "-m", "derms.cli.main", "serve", "--port", str(self.port)]
        if not self.mqtt:
            args.append("--no-mqtt")
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _cli(env, *args) -> str:
    return subprocess.run([sys.executable, "-m", "derms.cli.main", *args], env=env, text=True,
                          capture_output=True, check=True).stdout.strip()


def _batch(prefix: str, k: int) -> dict:
    series, t, value = [], [], []
    for s in range(PER_BATCH_S):
        sec = k * PER_BATCH_S + s
        stamp = f"2026-11-25T{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}Z"
        for d in range(N_DEV):
            series.append(f"{prefix}-{d}")
            t.append(stamp)
            value.append(float(sec + d))
    n = len(series)
    return {"series": series, "quantity": ["p"] * n, "unit": ["kW"] * n, "t": t, "value": value}


def _setup(db_url, tmp_path, mqtt: bool):
    env = {**os.environ, "DERMS_DATABASE_URL": db_url, "DERMS_DATA_DIR": str(tmp_path)}
    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    server = Server(env, mqtt, client_id=f"derms-{prefix}")
    server.start()
    admin = {"Authorization": f"Bearer {_cli(env, 'token', 'create', '--scope', 'admin')}"}
    for d in range(N_DEV):
        r = httpx.post(f"http://127.0.0.1:{server.port}/v1/devices", headers=admin, json={
            "der_id": f"{prefix}-{d}", "site_id": f"{prefix}-site", "der_type": "pv",
            "s_max_kva": 5})
        assert r.status_code == 201, r.text
    return env, prefix, server, admin


def _stored(db_url, prefix) -> tuple[int, int]:
    engine = make_engine(db_url)
    with engine.connect() as c:
        where = ("FROM readings r JOIN series s ON s.series_id = r.series_id "
                 "WHERE s.der_id LIKE :p")
        total = c.execute(text(f"SELECT count(*) {where}"), {"p": f"{prefix}-%"}).scalar()
        distinct = c.execute(text(f"SELECT count(*) FROM (SELECT DISTINCT r.series_id, r.t "
                                  f"{where}) d"), {"p": f"{prefix}-%"}).scalar()
    engine.dispose()
    return total, distinct


def test_rest_ingest_survives_kill(db_url, tmp_path):
    env, prefix, server, admin = _setup(db_url, tmp_path, mqtt=False)
    acked: set[int] = set()
    stop = threading.Event()
    op = {"Authorization": f"Bearer {_cli(env, 'token', 'create', '--scope', 'operate')}"}

    def sender():
        k = 0
        with httpx.Client(timeout=5) as client:
            while not stop.is_set() and k < 400:
                try:
                    r = client.post(f"http://127.0.0.1:{server.port}/v1/readings",
                                    headers=op, json=_batch(prefix, k))
                    if r.status_code == 200:
                        acked.add(k)
                except httpx.TransportError:
                    pass
                k += 1

    try:
        th = threading.Thread(target=sender)
        th.start()
        time.sleep(1.5)
        server.kill()  # mid-ingest, no shutdown
        stop.set()
        th.join()
        assert acked, "nothing was acknowledged before the kill"
        server.start()
        # the client retries everything it sent, acknowledged or not: idempotent
        sent = max(acked) + 2
        with httpx.Client(timeout=30) as client:
            for k in range(sent):
                r = client.post(f"http://127.0.0.1:{server.port}/v1/readings", headers=op,
                                json=_batch(prefix, k))
                assert r.status_code == 200
        total, distinct = _stored(db_url, prefix)
        assert total == distinct == sent * N_DEV * PER_BATCH_S
    finally:
        server.stop()


def test_mqtt_ingest_survives_kill(db_url, tmp_path):
    paho = pytest.importorskip("paho.mqtt.client")
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
    except OSError:
        pytest.skip("Mosquitto not running on :1883")
    env, prefix, server, _admin = _setup(db_url, tmp_path, mqtt=True)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{prefix}")
    pub.connect("127.0.0.1", 1883)
    pub.loop_start()
    n_batches = 120
    try:
        infos = []
        for k in range(n_batches):
            infos.append(pub.publish(f"test/derms-{prefix}/telemetry/der",
                                     json.dumps(_batch(prefix, k)), qos=1))
            if k == 40:
                server.kill()  # the subscriber's persistent session queues the rest
        for info in infos:
            info.wait_for_publish(timeout=10)  # every message accepted by the broker
        server.start()  # same client id: the broker redelivers what was not acknowledged
        expected = n_batches * N_DEV * PER_BATCH_S
        deadline = time.monotonic() + 60
        while _stored(db_url, prefix)[0] < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        total, distinct = _stored(db_url, prefix)
        assert total == distinct == expected
    finally:
        pub.loop_stop()
        pub.disconnect()
        server.stop()
        drop_session(f"derms-{prefix}")


def drop_session(client_id: str) -> None:
    """Remove a persistent session from the broker (a clean connect with its id)."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.connect("127.0.0.1", 1883)
    c.loop_start()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()
