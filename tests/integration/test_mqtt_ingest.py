"""MQTT ingest against the real Mosquitto broker at 127.0.0.1:1883."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest

from derms.ingest.mqtt import MqttIngest
from derms.ingest.parse import ReadingBatch
from tests.integration.test_crash_recovery import drop_session

paho = pytest.importorskip("paho.mqtt.client")


def _broker_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _broker_up(), reason="Mosquitto not running on :1883")


class KeyedSink:
    """An idempotent sink on the natural key (series, quantity, time): like the store."""

    def __init__(self) -> None:
        self.rows: dict[tuple, float] = {}
        self.writes = 0
        self.lock = threading.Lock()

    def __call__(self, batch: ReadingBatch) -> int:
        with self.lock:
            before = len(self.rows)
            for s, q, t, v in zip(batch.series, batch.quantity, batch.t_us, batch.value,
                                  strict=True):
                self.rows.setdefault((s, q, int(t)), float(v))
            self.writes += len(batch)
            return len(self.rows) - before


def _publisher():
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.connect("127.0.0.1", 1883)
    pub.loop_start()
    return pub


def test_every_reading_arrives_once_and_bad_payloads_are_reported():
    sink = KeyedSink()
    client_id = f"derms-test-{uuid.uuid4().hex[:8]}"
    root = f"test/{client_id}"  # own topics: other tests may use the broker at the same time
    ingest = MqttIngest(sink, client_id=client_id, max_delay_s=0.05, topic_root=root)
    ingest.start()
    pub = _publisher()
    errors: list[dict] = []
    pub.subscribe(root + "/errors/#", qos=1)
    pub.on_message = lambda _c, _u, m: errors.append(json.loads(m.payload))
    time.sleep(0.3)
    n_msg, per_msg = 200, 100
    infos = []
    for m in range(n_msg):
        rows = [{"series": f"dev-{k}", "quantity": "p", "unit": "kW",
                 "t": f"2026-11-25T10:{m // 60:02d}:{m % 60:02d}Z", "value": k + m / 1000}
                for k in range(per_msg)]
        infos.append(pub.publish(root + "/telemetry/der", json.dumps(rows), qos=1))
    # the same message twice (a retry by a device) must not duplicate anything
    infos.append(pub.publish(root + "/telemetry/der", json.dumps(rows), qos=1))
    infos.append(pub.publish(root + "/telemetry/der", b'[{"series": "x", "value": 1}]', qos=1))
    for info in infos:
        info.wait_for_publish(timeout=10)
    deadline = time.monotonic() + 20
    while (len(sink.rows) < n_msg * per_msg or not errors) and time.monotonic() < deadline:
        time.sleep(0.05)
    ingest.stop()
    pub.loop_stop()
    pub.disconnect()
    drop_session(client_id)
    assert len(sink.rows) == n_msg * per_msg  # nothing lost
    assert sink.writes == (n_msg + 1) * per_msg  # the resent message was written again ...
    assert ingest.stats.inserted == n_msg * per_msg  # ... but inserted nothing new
    assert ingest.stats.rejected == 1
    assert errors and "missing field" in errors[0]["detail"]
