"""MQTT telemetry subscriber: at-least-once delivery into an idempotent sink.

Topic scheme (QoS 1)
--------------------
``derms/v1/telemetry/<source>`` — payload: a JSON batch in any shape that
:func:`derms.ingest.parse.parse_json` accepts (one reading object, a list of them, or
columns). ``<source>`` (e.g. ``scada``, ``ami``, ``der``, an aggregator id) is stored as the
readings' source. A rejected payload is reported on ``derms/v1/errors/<source>`` (JSON:
``{"mid": …, "detail": …, "errors": [{"row", "field", "detail"}]}``) and acknowledged, so
it is not redelivered forever (the report is re-sent after a lost connection until the
broker has it, but not after a crash of the process).

Delivery: a persistent MQTT 5 session (``clean_start=False``, fixed client id, a
Receive Maximum of ``RECEIVE_MAXIMUM``) through the lean client of
:mod:`derms.ingest.mqtt_wire`, which acknowledges nothing by itself: the reader thread
only queues the messages of each chunk it reads; a parser thread validates them in
batches while a writer thread writes the previous batch through the sink (one
transaction per source) and only then acknowledges every message of it. A crash before the commit
leaves the messages unacknowledged, and the broker redelivers them; the sink must be
idempotent (the store drops duplicates on its natural key), so redelivery never
duplicates a reading. The reader stops reading (TCP holds the broker back) while more
than ``max_held_bytes`` of payload are received and not yet acknowledged.

A message is rejected (reported on the errors topic, then acknowledged) for anything
wrong with it -- its payload, or a ``<source>`` that is not 1-32 characters of
``[A-Za-z0-9_.:-]`` -- and never stops the pipeline: a payload that broke the parser
used to kill the parser thread, and, never acknowledged, was redelivered after every
restart to kill it again. A sink that fails for any other reason (the database is down)
keeps the batch and retries it.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from derms.errors import InputError, StoreUnavailable
from derms.ingest.mqtt_session import SESSION_EXPIRY_S
from derms.ingest.mqtt_wire import Message, WireSession
from derms.ingest.parse import (
    BatchError,
    KnownSeries,
    ReadingBatch,
    json_document,
    validate_documents,
)
from derms.store.timeseries import SOURCE_PATTERN

log = logging.getLogger(__name__)

TOPIC_ROOT = "derms/v1"
TOPIC_PREFIX = TOPIC_ROOT + "/telemetry/"
ERROR_PREFIX = TOPIC_ROOT + "/errors/"
_SOURCE = re.compile(SOURCE_PATTERN)

RECEIVE_MAXIMUM = 32_768
"""Unacknowledged QoS 1 messages the broker may send the ingest (MQTT 5 Receive Maximum).
A message is acknowledged after its batch's commit, ≈ 0.3-0.5 s after it arrived: 2,000
held the rate to ≈ 5,000 messages per second, and the broker queued the rest (its
``max_queued_messages``, 1,000 by default) and then dropped it. The window is also what
a moment of overload can build up without loss (10,000: 4 % of 10,000 small messages a
second lost over 60 s at 96 % of this machine's capacity); what the process holds of it is
bounded in bytes (``max_held_bytes``); beyond, the broker holds it."""
MAX_BATCH_MESSAGES = 5_000  # messages that close a write batch (with max_delay_s)

Sink = Callable[[ReadingBatch], int]
"""Writes a batch durably (commits) and returns how many readings were new."""


@dataclass
class IngestStats:
    """Counters of the subscriber (messages and readings) and what the broker says of
    its drops: ``broker_dropped_per_min`` (Mosquitto's ``$SYS`` 1-minute load of
    messages dropped, broker-wide; None until the broker reports one: it publishes the
    rate when it changes, that is after a drop, not while it stays 0)."""

    messages: int = 0
    rejected: int = 0
    readings: int = 0
    inserted: int = 0
    batches: int = 0
    broker_dropped_per_min: float | None = None


BROKER_DROPS = "$SYS/broker/load/publish/dropped/1min"
"""Mosquitto's moving average of messages it dropped per minute (any client: a queue full
for an offline or slow session), published every ``sys_interval`` (10 s by default)."""


def concat(batches: list[ReadingBatch]) -> ReadingBatch:
    """One batch from several (sources kept per reading is not needed: same source)."""
    return ReadingBatch(
        series=np.concatenate([b.series for b in batches]),
        quantity=np.concatenate([b.quantity for b in batches]),
        t_us=np.concatenate([b.t_us for b in batches]),
        value=np.concatenate([b.value for b in batches]),
        quality=np.concatenate([b.quality for b in batches]),
        source=batches[0].source,
    )


class MqttIngest:
    """Subscribe to ``derms/v1/telemetry/#`` and write readings through ``sink``.

    ``known_series`` (a set, or a function giving a mask of known ids; None accepts any id)
    rejects readings of unknown series.
    ``max_batch`` readings or ``max_delay_s`` seconds, whichever first, close a write batch.
    ``topic_root`` replaces ``derms/v1`` (e.g. one root per site or per test run).
    ``max_payload_bytes``: a larger message is refused (reported on the errors topic),
    like a request body above the API's limit. ``max_held_bytes``: payload received and
    not yet acknowledged beyond which the socket is not read.
    """

    def __init__(self, sink: Sink, *, host: str = "127.0.0.1", port: int = 1883,
                 client_id: str = "derms-ingest", known_series: KnownSeries = None,
                 max_batch: int = 50_000, max_delay_s: float = 0.2,
                 topic_root: str = TOPIC_ROOT, max_payload_bytes: int = 32 * 1024 * 1024,
                 max_held_bytes: int = 256 * 1024 * 1024) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.sink, self.known_series = sink, known_series
        self.max_payload_bytes = max_payload_bytes  # larger messages are refused
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self.max_batch_bytes = 16 * 1024 * 1024  # payload bytes that close a write batch
        self.max_held_bytes = max_held_bytes
        self.stats = IngestStats()
        self.telemetry_prefix = topic_root.rstrip("/") + "/telemetry/"
        self.error_prefix = topic_root.rstrip("/") + "/errors/"
        self.subscription = self.telemetry_prefix + "#"
        self._queue: queue.Queue = queue.Queue()  # lists of messages (one per chunk read)
        self._parsed: queue.Queue = queue.Queue(maxsize=4)  # parsed batches awaiting a write
        self._lock = threading.Lock()
        self._queued = 0       # messages received, not yet taken by the parser
        self._held_bytes = 0   # payload bytes received, not yet acknowledged
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.session = WireSession(
            host, port, client_id, subscriptions=self._subscriptions(),
            on_messages=self._on_messages, receive_maximum=RECEIVE_MAXIMUM,
            session_expiry_s=SESSION_EXPIRY_S,
            # stopping: what was read is drained, nothing more is read
            pause=lambda: self._stop.is_set() or self._held_bytes > self.max_held_bytes)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the parser and writer, then connect and subscribe; InputError if the
        broker is unreachable or does not accept the session within ``timeout_s``. (The
        workers first: the broker sends a session's backlog before the SUBACK, and past
        ``max_held_bytes`` of it the reader waits for them.)"""
        self._threads = self._workers()
        for thread in self._threads:
            thread.start()
        try:
            self.session.start(timeout_s)
        except InputError:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=30)
            raise

    def stop(self) -> None:
        """Let the workers finish what is queued (and acknowledge it), disconnect."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        self.session.stop()

    def queued(self) -> int:
        """Messages received and not yet taken by the parser."""
        return self._queued

    def _on_messages(self, msgs: list[Message]) -> None:
        """The reader thread: queue a chunk's messages (the broker's own drop report is
        read here, never queued)."""
        mine = [m for m in msgs if m.topic != BROKER_DROPS]
        for m in msgs:
            if m.topic == BROKER_DROPS:
                self._broker_drops(m.payload)
        if mine:
            size = sum(len(m.payload) for m in mine)
            with self._lock:
                self._queued += len(mine)
                self._held_bytes += size
            self._queue.put(mine)

    def _broker_drops(self, payload: bytes) -> None:
        """Keep the broker's drop rate; warn when it starts dropping (it drops QoS 1
        messages it acknowledged to a publisher once a session's queue is full: derms
        behind, or offline longer than ``max_queued_messages`` covers)."""
        try:
            rate = float(payload)
        except ValueError:
            return
        was, self.stats.broker_dropped_per_min = self.stats.broker_dropped_per_min, rate
        if rate >= 1.0 and not (was or 0.0) >= 1.0:
            log.warning("mqtt_broker_dropping per_min=%.1f queued_here=%d: the broker drops "
                        "messages (broker-wide; a session queue is full: is derms behind, "
                        "or max_queued_messages too small for an outage?)", rate,
                        self._queued)

    def _subscriptions(self) -> list[tuple[str, int]]:
        """(topic filter, QoS) subscribed on every connect."""
        return [(self.subscription, 1), (BROKER_DROPS, 0)]

    def _workers(self) -> list[threading.Thread]:
        return [threading.Thread(target=self._run_parser, name="mqtt-ingest-parser",
                                 daemon=True),
                threading.Thread(target=self._run_writer, name="mqtt-ingest-writer",
                                 daemon=True)]

    # -- pipeline: parser thread -> writer thread ----------------------------------------
    def _run_parser(self) -> None:
        """Parse batches of messages while the writer waits on the database. Where the
        store's id lookup fails (it is down), the batch is kept and parsed again: its
        messages were refused, and so acknowledged, unwritten."""
        while not (self._stop.is_set() and self._queue.empty()):
            msgs = self._take_batch()
            while msgs:
                try:
                    self._parsed.put(self._parse(msgs))
                    break
                except StoreUnavailable as exc:
                    log.warning("mqtt_store_unavailable messages=%d: %s; retrying",
                                len(msgs), exc)
                    time.sleep(1.0)
        self._parsed.put(None)

    def _run_writer(self) -> None:
        while (item := self._parsed.get()) is not None:
            msgs, by_source = item
            while True:
                try:
                    try:
                        self._write(msgs, by_source)
                    except InputError:  # the store refused what the parser let through:
                        # find the message(s) it was, reject them, write the others
                        by_source = self._refused(by_source)
                        self._write(msgs, by_source)
                    break
                except Exception:
                    # down): keep the batch (nothing acknowledged) and retry
                    log.exception("mqtt_sink_failed messages=%d; retrying", len(msgs))
                    time.sleep(1.0)

    def _refused(self, by_source: dict[str, list]) -> dict[str, list]:
        """Write each message alone; reject (report, acknowledge later with the batch) a
        message the sink refuses with InputError. Returns the groups still to write
        (none: every message was written or refused here). A sink failure that is not an
        InputError propagates (the caller retries the whole batch; the store is
        idempotent, so what was written here is not written twice)."""
        for source, items in by_source.items():
            for msg, batch in items:
                try:
                    self.stats.inserted += self.sink(batch)
                    self.stats.readings += len(batch)
                except InputError as exc:
                    self._reject(msg, source, exc)
        return {}

    def _take_batch(self) -> list[Message]:
        """The messages of the next batch: ``max_batch`` readings (about),
        ``MAX_BATCH_MESSAGES``, ``max_batch_bytes`` or ``max_delay_s``, whichever first."""
        msgs: list[Message] = []
        n = size = 0
        deadline = time.monotonic() + self.max_delay_s
        while n < self.max_batch and len(msgs) < MAX_BATCH_MESSAGES:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                chunk = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            with self._lock:
                self._queued -= len(chunk)
            msgs.extend(chunk)
            for msg in chunk:
                size += len(msg.payload)
                n += 1 + msg.payload.count(b"},")  # ~ readings (rows form)
            if size >= self.max_batch_bytes:
                break
        return msgs

    def _parse(self, msgs: list) -> tuple[list, dict[str, list[ReadingBatch]]]:
        """Valid batches grouped by source; invalid messages reported (and acknowledged
        with the rest, after the write). The messages of one source are validated
        together (:func:`~derms.ingest.parse.validate_documents`): one validation of a
        5-reading message cost ≈ 6 ms, which held a parser thread to ≈ 160 small
        messages per second, and the broker dropped what queued beyond that. Raises
        :class:`StoreUnavailable` (nothing reported yet) when the id lookup fails."""
        docs: dict[str, list[tuple]] = {}
        rejects: list[tuple] = []  # reported once the whole batch is validated
        for msg in msgs:
            source = msg.topic[len(self.telemetry_prefix):] or "mqtt"
            try:
                if not _SOURCE.match(source):
                    raise InputError(f"topic source {source!r}: expected 1-32 characters "
                                     "[A-Za-z0-9_.:-]")
                if len(msg.payload) > self.max_payload_bytes:  # as the API's 413
                    raise InputError(f"payload of {len(msg.payload)} bytes is larger than "
                                     f"{self.max_payload_bytes} (DERMS_MAX_BODY_BYTES)")
                docs.setdefault(source, []).append((msg, json_document(msg.payload)))
            except InputError as exc:
                rejects.append((msg, source, exc))
            except Exception as exc:
                log.exception("mqtt_parse_failed topic=%s", msg.topic)
                rejects.append((msg, source,
                                InputError(f"payload not accepted: {exc!r}"[:500])))
        by_source: dict[str, list[tuple]] = {}
        for source, items in docs.items():
            try:
                got = validate_documents([d for _m, d in items], source=source,
                                         known_series=self.known_series)
            except StoreUnavailable:
                raise
            except Exception as exc:
                log.exception("mqtt_parse_failed source=%s messages=%d", source, len(items))
                got = [InputError(f"payload not accepted: {exc!r}"[:500])] * len(items)
            for (msg, _d), batch in zip(items, got):
                if isinstance(batch, InputError):
                    rejects.append((msg, source, batch))
                else:
                    by_source.setdefault(source, []).append((msg, batch))
        for msg, source, exc in rejects:
            self._reject(msg, source, exc)
        return msgs, by_source

    def _write(self, msgs: list, by_source: dict[str, list[tuple]]) -> None:
        for items in by_source.values():
            batch = concat([b for _m, b in items])
            self.stats.inserted += self.sink(batch)  # commits; raises -> no ack, redelivery
            self.stats.readings += len(batch)
        self.stats.batches += 1
        self.stats.messages += len(msgs)
        self.session.ack(msgs)
        size = sum(len(m.payload) for m in msgs)
        with self._lock:
            self._held_bytes -= size

    def _reject(self, msg, source: str, exc: InputError) -> None:
        self.stats.rejected += 1
        errors = [vars(e) if not hasattr(e, "__slots__") else
                  {"row": e.row, "field": e.field, "detail": e.detail}
                  for e in getattr(exc, "errors", [])][:100]
        report = {"mid": msg.mid, "topic": msg.topic, "detail": str(exc), "errors": errors}
        log.warning("mqtt_rejected topic=%s detail=%s", msg.topic, exc)
        # the errors topic carries a valid source only (a topic level may hold anything)
        where = source if _SOURCE.match(source) else "invalid-source"
        self.session.publish(self.error_prefix + where,
                             json.dumps(report, ensure_ascii=True, default=str), qos=1)


__all__ = ["BROKER_DROPS", "ERROR_PREFIX", "TOPIC_PREFIX", "TOPIC_ROOT", "BatchError", "IngestStats",
           "MqttIngest", "Sink"]
