"""The twin's telemetry over MQTT (the other real protocol path into the DERMS): each
publish is one JSON batch in columns on ``<topic root>/telemetry/<source>`` at QoS 1, the
format ``derms serve``'s MQTT ingest takes (:mod:`derms.ingest.parse`): every online,
talking device's own output ``p_kw``/``q_kvar`` (net import: a generating DER is negative)
under its DER id, its site voltage ``v_v`` under its site meter, and the feeder head's
per-phase ``p_a_kw``…``q_c_kvar`` (import positive) under ``<feeder>-head``. Timestamps are
the step's stamp (wall clock in control mode), UTC ISO 8601.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import numpy as np
import paho.mqtt.client as mqtt

from derms.errors import InputError

log = logging.getLogger(__name__)


class MqttTelemetry:
    """Publisher of the fleet's and the head's readings (see module docstring)."""

    def __init__(self, host: str, port: int, topic_root: str = "derms/v1",
                 source: str = "sim", client_id: str = "derms-sim") -> None:
        self.topic = f"{topic_root.rstrip('/')}/telemetry/{source}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise InputError(f"--mqtt {host}:{port}: cannot connect ({exc})") from None
        self.client.loop_start()
        self.published = 0  # readings
        self.batches = 0

    def publish(self, epoch_s: int, der_ids: list[str], der_p_kw: np.ndarray,
                der_q_kvar: np.ndarray, meter_ids: list[str], v_v: np.ndarray,
                talking: np.ndarray, head_id: str | None = None,
                head_p_kw: np.ndarray | None = None,
                head_q_kvar: np.ndarray | None = None) -> int:
        """One batch; returns the number of readings in it."""
        t = datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")
        idx = np.flatnonzero(talking)
        series: list[str] = []
        quantity: list[str] = []
        values: list[float] = []
        for name, unit_q, arr in (("p", "p_kw", der_p_kw), ("q", "q_kvar", der_q_kvar)):
            series += [der_ids[i] for i in idx]
            quantity += [unit_q] * idx.size
            values += np.asarray(arr, float)[idx].tolist()
        series += [meter_ids[i] for i in idx]
        quantity += ["v_v"] * idx.size
        values += np.asarray(v_v, float)[idx].tolist()
        if head_id is not None and head_p_kw is not None:
            for ph, p, q in zip("abc", head_p_kw, head_q_kvar, strict=False):
                series += [head_id, head_id]
                quantity += [f"p_{ph}_kw", f"q_{ph}_kvar"]
                values += [float(p), float(q)]
        if not series:
            return 0
        payload = json.dumps({"series": series, "quantity": quantity,
                              "unit": [None] * len(series), "t": [t] * len(series),
                              "value": values})
        self.client.publish(self.topic, payload, qos=1)
        self.published += len(series)
        self.batches += 1
        return len(series)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
