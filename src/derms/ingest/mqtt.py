"""MQTT telemetry subscriber: at-least-once delivery into an idempotent sink.

Topic scheme (QoS 1)
--------------------
``derms/v1/telemetry/<source>`` — payload: a JSON batch in any shape that
:func:`derms.ingest.parse.parse_json` accepts (one reading object, a list of them, or
columns). ``<source>`` (e.g. ``scada``, ``ami``, ``der``, an aggregator id) is stored as the
readings' source. A rejected payload is reported on ``derms/v1/errors/<source>`` (JSON:
``{"mid": …, "detail": …, "errors": [{"row", "field", "detail"}]}``) and acknowledged, so
it is not redelivered forever.

Delivery: the client uses a persistent session (``clean_session=False``, fixed client id)
and ``manual_ack``: the network thread only queues messages; a parser thread validates them
in batches while a writer thread writes the previous batch through the sink in one
transaction and only then acknowledges every message of it. A crash before the commit leaves the messages
unacknowledged, and the broker redelivers them; the sink must be idempotent (the store
drops duplicates on its natural key), so redelivery never duplicates a reading.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from derms.errors import InputError
from derms.ingest.mqtt_session import QueuedSubscriber
from derms.ingest.parse import BatchError, KnownSeries, ReadingBatch, parse_json

log = logging.getLogger(__name__)

TOPIC_ROOT = "derms/v1"
TOPIC_PREFIX = TOPIC_ROOT + "/telemetry/"
ERROR_PREFIX = TOPIC_ROOT + "/errors/"

Sink = Callable[[ReadingBatch], int]
"""Writes a batch durably (commits) and returns how many readings were new."""


@dataclass
class IngestStats:
    """Counters of the subscriber (messages and readings)."""

    messages: int = 0
    rejected: int = 0
    readings: int = 0
    inserted: int = 0
    batches: int = 0


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


class MqttIngest(QueuedSubscriber):
    """Subscribe to ``derms/v1/telemetry/#`` and write readings through ``sink``.

    ``known_series`` (a set, or a function giving a mask of known ids; None accepts any id)
    rejects readings of unknown series.
    ``max_batch`` readings or ``max_delay_s`` seconds, whichever first, close a write batch.
    ``topic_root`` replaces ``derms/v1`` (e.g. one root per site or per test run).
    """

    def __init__(self, sink: Sink, *, host: str = "127.0.0.1", port: int = 1883,
                 client_id: str = "derms-ingest", known_series: KnownSeries = None,
                 max_batch: int = 50_000, max_delay_s: float = 0.2,
                 topic_root: str = TOPIC_ROOT) -> None:
        super().__init__(host, port, client_id, max_inflight=1000)
        self.sink, self.known_series = sink, known_series
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self.stats = IngestStats()
        self.telemetry_prefix = topic_root.rstrip("/") + "/telemetry/"
        self.error_prefix = topic_root.rstrip("/") + "/errors/"
        self.subscription = self.telemetry_prefix + "#"
        self._parsed: queue.Queue = queue.Queue(maxsize=4)  # parsed batches awaiting a write

    def _workers(self) -> list[threading.Thread]:
        return [threading.Thread(target=self._run_parser, name="mqtt-ingest-parser",
                                 daemon=True),
                threading.Thread(target=self._run_writer, name="mqtt-ingest-writer",
                                 daemon=True)]

    # -- pipeline: parser thread -> writer thread ----------------------------------------
    def _run_parser(self) -> None:
        """Parse batches of messages while the writer waits on the database."""
        while not (self._stop.is_set() and self._queue.empty()):
            msgs = self._take_batch()
            if msgs:
                self._parsed.put(self._parse(msgs))
        self._parsed.put(None)

    def _run_writer(self) -> None:
        while (item := self._parsed.get()) is not None:
            msgs, by_source = item
            while True:
                try:
                    self._write(msgs, by_source)
                    break
                except Exception:  # noqa: BLE001 - the sink failed: keep the batch, retry
                    log.exception("mqtt_sink_failed messages=%d; retrying", len(msgs))
                    time.sleep(1.0)

    def _take_batch(self) -> list:
        msgs, n = [], 0
        deadline = time.monotonic() + self.max_delay_s
        while n < self.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                msg = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            msgs.append(msg)
            n += 1 + msg.payload.count(b"},{")  # rough size: readings per message
        return msgs

    def _parse(self, msgs: list) -> tuple[list, dict[str, list[ReadingBatch]]]:
        """Valid batches grouped by source; invalid messages reported (and acknowledged
        with the rest, after the write)."""
        by_source: dict[str, list[ReadingBatch]] = {}
        for msg in msgs:
            source = msg.topic[len(self.telemetry_prefix):] or "mqtt"
            try:
                batch = parse_json(msg.payload, source=source, known_series=self.known_series)
            except InputError as exc:
                self._reject(msg, source, exc)
                continue
            by_source.setdefault(source, []).append(batch)
        return msgs, by_source

    def _write(self, msgs: list, by_source: dict[str, list[ReadingBatch]]) -> None:
        for batches in by_source.values():
            batch = concat(batches)
            self.stats.inserted += self.sink(batch)  # commits; raises -> no ack, redelivery
            self.stats.readings += len(batch)
        self.stats.batches += 1
        self.stats.messages += len(msgs)
        for msg in msgs:
            self.client.ack(msg.mid, msg.qos)

    def _reject(self, msg, source: str, exc: InputError) -> None:
        self.stats.rejected += 1
        errors = [vars(e) if not hasattr(e, "__slots__") else
                  {"row": e.row, "field": e.field, "detail": e.detail}
                  for e in getattr(exc, "errors", [])][:100]
        report = {"mid": msg.mid, "topic": msg.topic, "detail": str(exc), "errors": errors}
        log.warning("mqtt_rejected topic=%s detail=%s", msg.topic, exc)
        self.client.publish(self.error_prefix + source, json.dumps(report), qos=1)


__all__ = ["ERROR_PREFIX", "TOPIC_PREFIX", "TOPIC_ROOT", "BatchError", "IngestStats",
           "MqttIngest", "Sink"]
