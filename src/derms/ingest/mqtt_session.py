"""A persistent, at-least-once MQTT subscription (paho) whose messages are queued for
worker threads: the ADMS interface's. (The telemetry ingest, thousands of messages a
second, has its own lean client: :mod:`derms.ingest.mqtt_wire`.)

MQTT 5, a persistent session (``clean_start=False``, a fixed client id, a session expiry of
``SESSION_EXPIRY_S``) and ``manual_ack``: the network thread only queues messages; the
subclass's workers handle them and acknowledge after their commit (DESIGN.md "Known
traps": paho acknowledges QoS 1 before the code stored it otherwise).

Acknowledging after a commit holds every message of a batch unacknowledged for a batch
period (0.2 s). Under MQTT 3.1.1 the broker sends at most its ``max_inflight_messages``
(Mosquitto: 20) unacknowledged QoS 1 messages to a client, so small messages crawled in at
≈ 100 per second, and the broker's queue (``max_queued_messages``, 1,000) overflowed and
dropped the rest (46-93 % of 5-reading messages at 300 msg/s were lost). Under MQTT 5 the
client sets that window itself, ``Receive Maximum`` in CONNECT (``RECEIVE_MAXIMUM``,
which also bounds how much the process holds unwritten).
"""

from __future__ import annotations

import logging
import queue
import threading

from derms.errors import InputError

log = logging.getLogger(__name__)

# unacknowledged QoS 1 messages the broker may send us (MQTT 5): with acknowledgements
# after a ~0.2 s batch this allows ~10,000 messages/s, and bounds what is held unwritten
# (2,000 x the largest message; 20,000 let a backlog of 180 kB messages take GBs)
RECEIVE_MAXIMUM = 2_000
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps the session (and queues) this long


class QueuedSubscriber:
    """Subclasses set ``self.subscription`` (the topic filter) and implement
    :meth:`_workers` (threads started after the session is up, joined at :meth:`stop`)."""

    subscription: str

    def __init__(self, host: str, port: int, client_id: str, *,
                 max_inflight: int | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.host, self.port = host, port
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=True)
        if max_inflight is not None:
            self.client.max_inflight_messages_set(max_inflight)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._threads: list[threading.Thread] = []

    def _workers(self) -> list[threading.Thread]:
        raise NotImplementedError

    def _on_message(self, _client, _userdata, msg) -> None:
        """The network thread: queue the message for the workers."""
        self._queue.put(msg)

    def queued(self) -> int:
        """Messages received and not yet taken by a worker."""
        return self._queue.qsize()

    def _subscriptions(self) -> list[tuple[str, int]]:
        """(topic filter, QoS) subscribed on every connect."""
        return [(self.subscription, 1)]

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe, then start the workers; InputError if the broker is
        unreachable or does not accept the session within ``timeout_s``."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            self.client.connect(self.host, self.port, keepalive=30, clean_start=False,
                                properties=props)
        except OSError as exc:
            raise InputError(f"MQTT broker {self.host}:{self.port} unreachable: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            self.client.loop_stop()
            raise InputError(f"MQTT broker {self.host}:{self.port} did not accept the session")
        self._threads = self._workers()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Let the workers finish what is queued (and acknowledge it), disconnect."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("mqtt_connect_failed subscription=%s reason=%s", self.subscription,
                      reason_code)
            return
        for topic, qos in self._subscriptions():
            client.subscribe(topic, qos=qos)
        self._connected.set()
