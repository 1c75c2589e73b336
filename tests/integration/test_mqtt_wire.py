"""The lean MQTT 5 subscriber (derms.ingest.mqtt_wire) against the real Mosquitto broker,
with paho as the publishing client: delivery, acknowledgement after the caller's commit,
session resumption after a lost connection, keep-alive, error reports."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from derms.ingest.mqtt_wire import Message, WireSession, _properties, _read_varint, varint
from tests.integration.test_crash_recovery import drop_session
from tests.integration.test_mqtt_ingest import KeyedSink, _broker_up, _publisher, _rows, _wait

paho = pytest.importorskip("paho.mqtt.client")
pytestmark = pytest.mark.skipif(not _broker_up(), reason="Mosquitto not running on :1883")


def test_variable_byte_integers_and_properties_round_trip():
    for n in (0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455):
        enc = varint(n)
        assert _read_varint(enc, 0) == (n, len(enc))
        assert _read_varint(enc[:-1], 0) is None  # incomplete
    # Session Expiry (4 bytes), Receive Maximum (2), Reason String, a User Property pair,
    # a Subscription Identifier (variable byte integer)
    body = (b"\x11\x00\x00\x0e\x10" + b"\x21\x07\xd0" + b"\x1f\x00\x02ok"
            + b"\x26\x00\x01k\x00\x01v" + b"\x0b" + varint(300))
    props, end = _properties(varint(len(body)) + body, 0)
    assert props == {0x11: 3600, 0x21: 2000, 0x1F: "ok", 0x26: "v", 0x0B: 300}
    assert end == len(varint(len(body))) + len(body)


class Collector:
    def __init__(self) -> None:
        self.msgs: list[Message] = []
        self.lock = threading.Lock()

    def __call__(self, msgs: list[Message]) -> None:
        with self.lock:
            self.msgs.extend(msgs)


def _session(topic: str, on_messages, client_id: str | None = None, **kw) -> WireSession:
    s = WireSession("127.0.0.1", 1883, client_id or f"wire-{uuid.uuid4().hex[:8]}",
                    subscriptions=[(topic, 1)], on_messages=on_messages,
                    receive_maximum=kw.pop("receive_maximum", 100), session_expiry_s=300,
                    **kw)
    s.start()
    return s


def _end(s: WireSession, pub) -> None:
    """Stop the session and the publisher; drop the session the broker keeps."""
    client_id = s.client_id
    s.stop()
    pub.loop_stop()
    pub.disconnect()
    drop_session(client_id)


def test_unacknowledged_messages_come_again_after_a_lost_connection_and_acked_ones_not():
    """Messages are acknowledged only when the caller says so; after the connection is
    lost, the broker re-sends (DUP) what was not acknowledged, and nothing else; an
    acknowledgement of a message of the old connection is not sent on the new one."""
    topic = f"test/wire-{uuid.uuid4().hex[:8]}/t"
    got = Collector()
    s = _session(topic, got)
    pub = _publisher()
    _wait([pub.publish(topic, f"m{i}", qos=1) for i in range(20)], lambda: len(got.msgs) == 20)
    assert [m.payload for m in got.msgs] == [f"m{i}".encode() for i in range(20)]
    first, old = got.msgs[:10], got.msgs[10:]
    assert s.ack(first) == 10
    time.sleep(0.3)
    s._sock.shutdown(2)  # the connection is lost: the reader re-connects
    deadline = time.monotonic() + 10
    while len(got.msgs) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    again = got.msgs[20:]
    assert sorted(m.payload for m in again) == sorted(m.payload for m in old)
    assert all(m.dup and m.conn == s.conn for m in again) and s.conn == 2
    assert s.ack(old) == 0  # meant for the old connection: not sent
    assert s.ack(again) == 10
    _wait([pub.publish(topic, "after", qos=1)], lambda: len(got.msgs) == 31)
    assert got.msgs[-1].payload == b"after" and not got.msgs[-1].dup
    s.ack(got.msgs[-1:])
    time.sleep(0.3)
    client_id = s.client_id
    s.stop()
    # the session kept by the broker holds nothing unacknowledged: a new connection gets
    # nothing
    got2 = Collector()
    s2 = _session(topic, got2, client_id=client_id)
    time.sleep(1.0)
    s2.stop()
    pub.loop_stop()
    pub.disconnect()
    drop_session(client_id)
    assert got2.msgs == []


def test_the_keep_alive_holds_an_idle_session_and_reports_are_published():
    """An idle session pings the broker within its keep-alive (2 s here) and is not
    dropped; a QoS 1 report published by the session reaches a subscriber."""
    root = f"test/wire-{uuid.uuid4().hex[:8]}"
    got = Collector()
    s = _session(root + "/in", got, keepalive_s=2)
    pub = _publisher()
    reports: list[bytes] = []
    pub.subscribe(root + "/out", qos=1)
    pub.on_message = lambda _c, _u, m: reports.append(m.payload)
    time.sleep(5.0)  # 2.5 keep-alive periods without traffic
    assert s.conn == 1 and s.connected.is_set()
    s.publish(root + "/out", b'{"detail": "x"}')
    _wait([pub.publish(root + "/in", "late", qos=1)],
          lambda: len(got.msgs) == 1 and len(reports) == 1)
    assert s.conn == 1 and got.msgs[0].payload == b"late" and reports == [b'{"detail": "x"}']
    assert not s._outgoing  # the broker acknowledged the report
    s.ack(got.msgs)
    _end(s, pub)


def test_ingest_through_a_lost_connection_stores_every_reading_once():
    """The ingest's connection is cut while messages flow: every reading arrives, once."""
    from derms.ingest.mqtt import MqttIngest

    sink = KeyedSink()
    client_id = f"derms-test-{uuid.uuid4().hex[:8]}"
    root = f"test/{client_id}"
    ingest = MqttIngest(sink, client_id=client_id, topic_root=root, max_delay_s=0.05)
    ingest.start()
    pub = _publisher()
    infos = [pub.publish(root + "/telemetry/der", _rows(m), qos=1) for m in range(300)]
    ingest.session._sock.shutdown(2)
    infos += [pub.publish(root + "/telemetry/der", _rows(m), qos=1) for m in range(300, 600)]
    _wait(infos, lambda: len(sink.rows) == 5 * 600)
    ingest.stop()
    pub.loop_stop()
    pub.disconnect()
    drop_session(client_id)
    assert len(sink.rows) == 5 * 600
    assert ingest.session.conn >= 2


def test_a_client_id_taken_over_backs_off_instead_of_taking_it_back_at_once():
    """Two sessions with one client id (a second ingest started by mistake): each used to
    take the session back from the other at once, thousands of CONNECTs a second (an
    independent review). The one taken over now waits before re-connecting."""
    client_id = f"wire-take-{uuid.uuid4().hex[:8]}"
    a = _session(f"test/{client_id}/#", Collector(), client_id=client_id)
    b = _session(f"test/{client_id}/#", Collector(), client_id=client_id)
    time.sleep(4.0)
    conns = a.conn + b.conn
    a.stop()
    b.stop()
    drop_session(client_id)
    assert conns <= 6, conns


def test_a_malformed_publish_or_a_failing_callback_reconnects_instead_of_killing_the_reader():
    """A callback that raises (or a packet the reader cannot decode) ended the reader
    thread for good: nothing more was read or acknowledged (an independent review). The
    reader now re-connects; the message, never acknowledged, comes again."""
    topic = f"test/wire-{uuid.uuid4().hex[:8]}/t"
    got, calls = Collector(), []

    def flaky(msgs):
        calls.append(len(msgs))
        if len(calls) == 1:
            raise RuntimeError("a defect in the callback")
        got(msgs)

    s = _session(topic, flaky)
    pub = _publisher()
    _wait([pub.publish(topic, "one", qos=1)], lambda: len(got.msgs) >= 1, timeout_s=10)
    assert [m.payload for m in got.msgs] == [b"one"] and got.msgs[0].dup
    assert s.conn == 2 and s._thread.is_alive()
    s.ack(got.msgs)
    _end(s, pub)
