"""ADMS messages on the message bus (MQTT, QoS 1, acknowledged after the store commit).

Topic scheme (``<root>`` is ``derms/v1`` unless configured, ``<sender>`` the ADMS's id,
e.g. ``adms1``, recorded as the audit actor ``mqtt:<sender>``):

* ``<root>/adms/<sender>/requests`` — in: one ADMS message per publish, JSON as
  :mod:`derms.control.adms` documents; ``message_id`` is required (a redelivered message
  must be recognised as the same request);
* ``<root>/adms/<sender>/results`` — out: ``{"message_id", "status": "accepted" |
  "duplicate", "request_ids", "withdrawn", "topology_event_ids"}`` after the commit;
* ``<root>/adms/<sender>/errors`` — out: ``{"message_id", "mid", "detail", "errors":
  [{"field", "detail"}]}`` for a rejected message (invalid JSON or schema, unknown
  feeder/device, expiry already passed, a reused id with other content); nothing of a
  rejected message is stored, and it is acknowledged so it is not redelivered forever.

Delivery: persistent MQTT 5 session (``clean_start=False``, fixed client id) and
``manual_ack``: the network thread only queues messages; one worker thread validates each,
stores it in one transaction and only then acknowledges it (and publishes the result). If
the store fails the message is retried and stays unacknowledged, so a crash before the
commit means redelivery, which the message id makes idempotent.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from derms.control.adms import MessageError, apply_adms, parse_adms
from derms.errors import InputError
from derms.ingest.mqtt_session import QueuedSubscriber
from derms.store.types import utcnow

log = logging.getLogger(__name__)


@dataclass
class AdmsStats:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0


class AdmsMqtt(QueuedSubscriber):
    """Subscribe to ``<root>/adms/+/requests`` and apply each message to the store.

    ``on_topology(feeder_id)`` is called after a commit that stored new switch states (e.g.
    the monitor's ``notify_topology_change``). ``clock`` gives "now" (aware UTC).
    """

    def __init__(self, sessions: sessionmaker[Session], *, host: str = "127.0.0.1",
                 port: int = 1883, client_id: str = "derms-adms", topic_root: str = "derms/v1",
                 on_topology: Callable[[str], None] | None = None,
                 clock: Callable[[], datetime] = utcnow, retry_s: float = 1.0) -> None:
        super().__init__(host, port, client_id)
        self.sessions, self.on_topology, self.clock = sessions, on_topology, clock
        self.retry_s = retry_s
        self.prefix = topic_root.rstrip("/") + "/adms/"
        self.subscription = self.prefix + "+/requests"
        self.stats = AdmsStats()

    def _workers(self) -> list[threading.Thread]:
        return [threading.Thread(target=self._run, name="adms-mqtt", daemon=True)]

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                msg = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.handle(msg)

    def handle(self, msg) -> None:
        """Validate, store, acknowledge one message (the worker thread's step)."""
        sender = msg.topic[len(self.prefix):].split("/", 1)[0] or "unknown"
        message_id = None
        try:
            parsed = parse_adms(msg.payload)
            message_id = parsed.message_id
            if message_id is None:
                raise InputError("message_id is required on the message bus (a redelivered "
                                 "message must be recognised)")
        except InputError as exc:
            self._reject(msg, sender, message_id or _message_id(msg.payload), exc)
            return
        while True:
            try:
                with self.sessions.begin() as s:
                    applied = apply_adms(s, parsed, actor=f"mqtt:{sender}", now=self.clock())
                break
            except InputError as exc:  # unknown target, conflict, expired: the ADMS must fix it
                self._reject(msg, sender, message_id, exc)
                return
            except Exception:
                if self._stop.is_set():
                    log.error("adms_mqtt_store_failed message_id=%s; left unacknowledged",
                              message_id)
                    return
                log.exception("adms_mqtt_store_failed message_id=%s; retrying", message_id)
                time.sleep(self.retry_s)
        for fid in applied.feeders_switched:
            if self.on_topology is not None:
                self.on_topology(fid)
        new = applied.created or bool(applied.withdrawn)
        self.stats.accepted += new
        self.stats.duplicates += not new
        result = {"message_id": message_id, "status": "accepted" if new else "duplicate",
                  "request_ids": [r.request_id for r in applied.requests],
                  "withdrawn": applied.withdrawn,
                  "topology_event_ids": applied.topology_event_ids}
        self.client.ack(msg.mid, msg.qos)
        self.client.publish(self.prefix + sender + "/results", json.dumps(result), qos=1)
        log.info("adms_mqtt_applied sender=%s message_id=%s status=%s requests=%s",
                 sender, message_id, result["status"], result["request_ids"])

    def _reject(self, msg, sender: str, message_id: str | None, exc: InputError) -> None:
        self.stats.rejected += 1
        errors = exc.errors if isinstance(exc, MessageError) else []
        report = {"message_id": message_id, "mid": msg.mid, "detail": str(exc),
                  "errors": errors}
        log.warning("adms_mqtt_rejected topic=%s message_id=%s detail=%s", msg.topic,
                    message_id, exc)
        self.client.ack(msg.mid, msg.qos)
        self.client.publish(self.prefix + sender + "/errors", json.dumps(report), qos=1)


def _message_id(payload: bytes) -> str | None:
    """The ``message_id`` of an invalid message, if it has a readable one (for the report)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    mid = data.get("message_id") if isinstance(data, dict) else None
    return mid if isinstance(mid, str) and len(mid) <= 48 else None


__all__ = ["AdmsMqtt", "AdmsStats"]
