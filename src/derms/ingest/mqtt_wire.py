"""A lean MQTT 5 subscriber session for high message rates (the telemetry ingest).

Why not paho: paho reads a packet with several ``recv`` calls and builds a
``Properties``, an ``MQTTMessage`` and an ``MQTTMessageInfo`` (with its own
``threading.Condition``) per message; on this machine that held one process to
≈ 5,000 small QoS 1 messages per second of its one interpreter core, and the broker
dropped what queued beyond its ``max_queued_messages``. Here the socket is read in large
chunks, every whole packet of a chunk is decoded in one pass, the messages of a chunk are
handed over as one list, and the acknowledgements of a batch go out in one ``sendall``.

What it does (OASIS MQTT 5.0, the parts a QoS 1 subscriber needs): CONNECT with
``clean_start`` off, a Session Expiry Interval and a Receive Maximum; SUBSCRIBE; PUBLISH
received at QoS 0/1 (properties skipped: no Topic Alias Maximum is sent, so the broker
sends no aliases); PUBACK sent by the caller after its commit (:meth:`WireSession.ack`);
QoS 1 PUBLISH sent (error reports), kept until the broker's PUBACK and sent again with
DUP after a reconnect; PINGREQ for the keep-alive (the broker's Server Keep Alive
honoured); DISCONNECT both ways. A lost connection (or a defect in reading) is re-opened
after a back-off and the session resumed; the broker then re-sends what was not acknowledged, so acknowledgements
of messages from an earlier connection are dropped (:attr:`Message.conn`) rather than
sent on the new one, where their packet ids mean other messages.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

from derms.errors import InputError

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
_RECV_BYTES = 1 << 18
# property id -> size in bytes (int), or "s" (UTF-8 string / binary data: 2-byte length),
# "p" (string pair), "v" (variable byte integer)  -- MQTT 5.0 section 2.2.2.2
_PROPS: dict[int, int | str] = {
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "s", 0x0B: "v", 0x11: 4, 0x12: "s",
    0x13: 2, 0x15: "s", 0x16: "s", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s",
    0x1F: "s", 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1,
    0x29: 1, 0x2A: 1}


class ProtocolError(Exception):
    """The broker sent something this session does not accept (the connection is
    closed and re-opened)."""


class TakenOver(ProtocolError):
    """The broker closed the connection because another one took the client id over."""


STABLE_S = 10.0  # a connection that lived this long resets the re-connect back-off


class Message:
    """A received PUBLISH: ``topic``, ``payload`` (bytes), ``mid`` (packet id; 0 for
    QoS 0), ``qos``, ``dup`` and ``conn`` (the connection it came on)."""

    __slots__ = ("conn", "dup", "mid", "payload", "qos", "topic")

    def __init__(self, topic: str, payload: bytes, mid: int, qos: int, dup: bool,
                 conn: int) -> None:
        self.topic, self.payload, self.mid = topic, payload, mid
        self.qos, self.dup, self.conn = qos, dup, conn


def varint(n: int) -> bytes:
    """MQTT variable byte integer (0 <= n < 2**28)."""
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf, pos: int) -> tuple[int, int] | None:
    """(value, bytes used) of the variable byte integer at ``pos``; None if incomplete."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ProtocolError("malformed variable byte integer")


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + varint(len(body)) + body


def _properties(buf, pos: int) -> tuple[dict[int, object], int]:
    """The properties at ``pos`` (their length first) and the position after them."""
    got = _read_varint(buf, pos)
    if got is None:
        raise ProtocolError("truncated properties")
    length, used = got
    pos += used
    end, props = pos + length, {}
    while pos < end:
        pid = buf[pos]
        kind = _PROPS.get(pid)
        pos += 1
        if kind is None:
            raise ProtocolError(f"unknown property 0x{pid:02x}")
        if isinstance(kind, int):
            props[pid] = int.from_bytes(buf[pos:pos + kind], "big")
            pos += kind
        elif kind == "v":
            got = _read_varint(buf, pos)
            if got is None:
                raise ProtocolError("truncated property")
            props[pid], used = got
            pos += used
        else:
            for _ in range(2 if kind == "p" else 1):
                n = int.from_bytes(buf[pos:pos + 2], "big")
                props[pid] = bytes(buf[pos + 2:pos + 2 + n]).decode("utf-8", "replace")
                pos += 2 + n
    if pos != end:
        raise ProtocolError("properties overrun their length")
    return props, end


class WireSession:
    """One persistent MQTT 5 session: ``on_messages(list[Message])`` is called from the
    reader thread with the messages of each chunk read (in order); the caller
    acknowledges QoS 1 messages with :meth:`ack` once it has stored them.

    ``receive_maximum`` bounds the unacknowledged QoS 1 messages the broker sends;
    ``session_expiry_s`` how long the broker keeps the session (and queues for it) while
    disconnected; while ``pause()`` is true the socket is not read (TCP holds the broker
    back; the keep-alive goes on)."""

    def __init__(self, host: str, port: int, client_id: str, *,
                 subscriptions: Iterable[tuple[str, int]],
                 on_messages: Callable[[list[Message]], None],
                 receive_maximum: int, session_expiry_s: int, keepalive_s: int = 30,
                 pause: Callable[[], bool] | None = None) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.subscriptions = list(subscriptions)
        self.on_messages = on_messages
        self.receive_maximum, self.session_expiry_s = receive_maximum, session_expiry_s
        self.keepalive_s, self.pause = keepalive_s, pause
        self.conn = 0           # connection generation (acks of older ones are dropped)
        self.connected = threading.Event()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_id = 0
        # our QoS 1 PUBLISHes not yet acknowledged: id -> [topic, payload, sent once]
        self._outgoing: dict[int, list] = {}
        self._topics: dict[bytes, str] = {}
        self._last_sent = self._last_recv = time.monotonic()
        self._ping_out = False
        self._subscribed = threading.Event()
        self._sub_error = ""

    # -- public ------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe (InputError if the broker is unreachable or refuses),
        then read in a thread that re-connects when the connection is lost."""
        try:
            self._open(timeout_s)
        except (OSError, ProtocolError) as exc:
            self._close()
            raise InputError(f"MQTT broker {self.host}:{self.port} did not accept the "
                             f"session: {exc}") from None
        self._thread = threading.Thread(target=self._run, name=f"mqtt-wire-{self.client_id}",
                                        daemon=True)
        self._thread.start()
        if not self._subscribed.wait(timeout_s) or self._sub_error:
            self.stop()
            raise InputError(f"MQTT broker {self.host}:{self.port} did not accept the "
                             f"subscriptions: {self._sub_error or 'no SUBACK'}")

    def ack(self, msgs: Iterable[Message]) -> int:
        """Acknowledge the QoS 1 messages of ``msgs`` that came on the current connection
        (one write); returns how many were sent (0 if the write failed). The others are
        re-sent by the broker."""
        conn = self.conn
        ids = [m.mid for m in msgs if m.qos == 1 and m.conn == conn]
        if not ids:
            return 0
        data = b"".join(struct.pack("!BBH", PUBACK, 2, mid) for mid in ids)
        return len(ids) if self._send(data, conn) else 0

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        """Publish (QoS 0 or 1). A QoS 1 message is kept until the broker acknowledges
        it and sent again after a reconnect."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        with self._send_lock:
            mid = self._new_id() if qos else 0
            if mid:
                self._outgoing[mid] = [topic, payload, False]
        sent = self._send(self._publish_packet(topic, payload, mid, dup=False), self.conn)
        if mid and sent:
            with self._send_lock:
                if mid in self._outgoing:
                    self._outgoing[mid][2] = True

    def _new_id(self) -> int:
        """A packet id no unacknowledged PUBLISH of ours holds (call under the lock)."""
        self._next_id = self._next_id % 65535 + 1
        while self._next_id in self._outgoing:
            self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def stop(self, timeout_s: float = 10.0) -> None:
        """Disconnect normally (the broker keeps the session) and stop reading."""
        self._stop.set()
        self._send(bytes([DISCONNECT, 0]), self.conn)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self._close()

    # -- connection --------------------------------------------------------------------
    def _open(self, timeout_s: float) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        props = (bytes([0x11]) + struct.pack("!I", self.session_expiry_s)
                 + bytes([0x21]) + struct.pack("!H", self.receive_maximum))
        body = (_string("MQTT") + bytes([5, 0x00]) + struct.pack("!H", self.keepalive_s)
                + varint(len(props)) + props + _string(self.client_id))
        sock.sendall(_packet(CONNECT, body))
        buf = bytearray()
        kind, pkt = self._read_one(sock, buf)
        if kind != CONNACK or len(pkt) < 2:
            raise ProtocolError(f"expected CONNACK, got packet type 0x{kind:02x}")
        if pkt[1] >= 0x80:
            props, _ = _properties(pkt, 2) if len(pkt) > 2 else ({}, 2)
            raise ProtocolError(f"CONNECT refused: reason 0x{pkt[1]:02x} "
                                f"{props.get(0x1F, '')}".rstrip())
        props, _ = _properties(pkt, 2) if len(pkt) > 2 else ({}, 2)
        keepalive = int(props.get(0x13, self.keepalive_s))  # Server Keep Alive
        subs = b"".join(_string(f) + bytes([q]) for f, q in self.subscriptions)
        # the SUBACK is read by the reader (the broker may send the session's queued
        # PUBLISHes before it); its packet id is none of our unacknowledged reports'
        with self._send_lock:
            sub_id = self._new_id()
        sock.sendall(_packet(SUBSCRIBE, struct.pack("!H", sub_id) + b"\x00" + subs))
        sock.settimeout(1.0)
        with self._send_lock:
            self.conn += 1
            self._sock, self._buf = sock, buf
            self._ka = max(keepalive, 0)
            self._last_sent = self._last_recv = time.monotonic()
            self._ping_out = False
            resend = [(mid, list(item)) for mid, item in self._outgoing.items()]
        for mid, (topic, payload, sent) in resend:  # reports the broker did not acknowledge
            if self._send(self._publish_packet(topic, payload, mid, dup=sent), self.conn):
                with self._send_lock:
                    if mid in self._outgoing:
                        self._outgoing[mid][2] = True
        self.connected.set()

    @staticmethod
    def _read_one(sock: socket.socket, buf: bytearray) -> tuple[int, memoryview]:
        """One whole packet (type byte, body) read during the handshake."""
        while True:
            if len(buf) >= 2:
                got = _read_varint(buf, 1)
                if got is not None and len(buf) >= 1 + got[1] + got[0]:
                    start = 1 + got[1]
                    kind, body = buf[0], bytes(buf[start:start + got[0]])
                    del buf[:start + got[0]]
                    return kind, memoryview(body)
            chunk = sock.recv(_RECV_BYTES)
            if not chunk:
                raise ProtocolError("the broker closed the connection")
            buf += chunk

    def _close(self) -> None:
        self.connected.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _send(self, data: bytes, conn: int) -> bool:
        """Write ``data`` on connection ``conn``; False if not connected or it failed. A
        failed (maybe partial) write leaves the stream broken: the connection is shut, and
        the reader re-connects (what was not acknowledged is re-sent by the broker)."""
        with self._send_lock:
            if self._sock is None or conn != self.conn:
                return False  # not connected, or meant for an older connection
            try:
                self._sock.sendall(data)
                self._last_sent = time.monotonic()
                return True
            except OSError as exc:
                log.warning("mqtt_send_failed client=%s: %s; re-connecting", self.client_id,
                            exc)
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return False

    def _publish_packet(self, topic: str, payload: bytes, mid: int, dup: bool) -> bytes:
        head = PUBLISH | (0x02 if mid else 0) | (0x08 if dup else 0)
        body = _string(topic) + (struct.pack("!H", mid) if mid else b"") + b"\x00" + payload
        return _packet(head, body)

    # -- reader thread -----------------------------------------------------------------
    def _run(self) -> None:
        """Read; after a lost connection, wait (doubling from 0.5 s to 30 s; reset once a
        connection has lived ``STABLE_S``) and re-open. A client id taken over by another
        connection waits the longest."""
        backoff = 0.5
        opened = time.monotonic()
        while not self._stop.is_set():
            if self._sock is None:
                try:
                    self._open(10.0)
                    opened = time.monotonic()
                    log.info("mqtt_reconnected client=%s", self.client_id)
                except (OSError, ProtocolError) as exc:
                    self._close()
                    log.warning("mqtt_reconnect_failed client=%s: %s; retry in %.1f s",
                                self.client_id, exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
            try:
                self._read_loop()
                continue  # stopping
            except TakenOver as exc:
                log.error("mqtt_session_taken_over client=%s: %s (another client uses this "
                          "client id)", self.client_id, exc)
                backoff = 30.0
            except (OSError, ProtocolError) as exc:
                if self._stop.is_set():
                    continue
                log.warning("mqtt_connection_lost client=%s: %s", self.client_id, exc)
            except Exception:  # a defect here, or in on_messages: nothing acknowledged
                log.exception("mqtt_reader_failed client=%s; re-connecting", self.client_id)
            self._close()
            if time.monotonic() - opened >= STABLE_S:
                backoff = 0.5
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def _read_loop(self) -> None:
        sock, buf = self._sock, self._buf
        assert sock is not None
        if buf:  # what the handshake read past the CONNACK
            self._deliver(buf)
        while not self._stop.is_set():
            paused = self.pause is not None and self.pause()
            chunk = None
            if paused:  # unread: the broker's PINGRESP too, so liveness is not judged
                self._stop.wait(0.02)
                self._last_recv = time.monotonic()
            else:
                try:
                    chunk = sock.recv(_RECV_BYTES)
                except TimeoutError:
                    pass
            now = time.monotonic()
            if chunk == b"":
                raise ProtocolError("the broker closed the connection")
            if chunk:
                self._last_recv = now
                buf += chunk
                self._deliver(buf)
            if self._ka:
                if self._ping_out and now - self._last_recv > 1.5 * self._ka:
                    raise ProtocolError(f"no answer from the broker for {self._ka * 1.5:.0f} s")
                if now - self._last_sent >= 0.5 * self._ka and (paused or not self._ping_out):
                    self._ping_out = True
                    self._send(bytes([PINGREQ, 0]), self.conn)

    def _deliver(self, buf: bytearray) -> None:
        """Decode every whole packet in ``buf`` (and drop them from it); hand over the
        PUBLISHes as one list."""
        msgs: list[Message] = []
        pos, n, conn, topics = 0, len(buf), self.conn, self._topics
        while n - pos >= 2:
            kind = buf[pos]
            got = _read_varint(buf, pos + 1)
            if got is None:
                break
            length, used = got
            start = pos + 1 + used
            end = start + length
            if end > n:
                break
            if kind & 0xF0 == PUBLISH:
                if length < 2 or start + 2 + ((buf[start] << 8) | buf[start + 1]) > end:
                    raise ProtocolError("malformed PUBLISH (topic beyond the packet)")
                qos = (kind >> 1) & 3
                tlen = (buf[start] << 8) | buf[start + 1]
                p = start + 2 + tlen
                raw = bytes(buf[start + 2:p])
                topic = topics.get(raw)
                if topic is None:
                    try:
                        topic = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ProtocolError("PUBLISH topic is not UTF-8") from None
                    if len(topics) < 10_000:
                        topics[raw] = topic
                mid = 0
                if qos:
                    if qos == 2:
                        raise ProtocolError("QoS 2 PUBLISH on a QoS 1 subscription")
                    if p + 2 > end:
                        raise ProtocolError("malformed PUBLISH (no packet id)")
                    mid = (buf[p] << 8) | buf[p + 1]
                    p += 2
                if p >= end:
                    raise ProtocolError("malformed PUBLISH (no properties length)")
                if buf[p] < 0x80:  # properties length (skipped)
                    p += 1 + buf[p]
                else:
                    plen, pused = _read_varint(buf, p) or (0, 1)
                    p += pused + plen
                if p > end:
                    raise ProtocolError("malformed PUBLISH (properties beyond the packet)")
                msgs.append(Message(topic, bytes(buf[p:end]), mid, qos, bool(kind & 0x08),
                                    conn))
            elif kind == PUBACK:  # of our own QoS 1 PUBLISH
                with self._send_lock:
                    self._outgoing.pop((buf[start] << 8) | buf[start + 1], None)
            elif kind == PINGRESP:
                self._ping_out = False
            elif kind == DISCONNECT:
                reason = buf[start] if length else 0
                if reason == 0x8E:  # Session taken over
                    raise TakenOver("the broker disconnected: session taken over (0x8e)")
                raise ProtocolError(f"the broker disconnected (reason 0x{reason:02x})")
            elif kind == SUBACK:
                _props, p = _properties(buf, start + 2)
                codes = bytes(buf[p:end])
                if any(c >= 0x80 for c in codes):
                    self._sub_error = f"SUBSCRIBE refused: reason codes {codes.hex()}"
                    log.error("mqtt_subscribe_refused client=%s %s", self.client_id,
                              self._sub_error)
                self._subscribed.set()
            else:
                raise ProtocolError(f"unexpected packet type 0x{kind:02x}")
            pos = end
        del buf[:pos]
        if msgs:
            self.on_messages(msgs)


__all__ = ["Message", "ProtocolError", "WireSession", "varint"]
