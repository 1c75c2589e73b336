"""The board between the protocol thread (agents) and the physics loop (runner).

Agents write what each device has received (its active event's control, its default
control, when it last reached the server); the physics loop writes what each device
measures and which devices the scenario has silenced or dropped. One lock; every read the
physics loop makes is a copy, so neither side ever sees half a row.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from derms.sim.fleet import Controls, effective_controls


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    responses: int = 0
    readings_posts: int = 0
    polls: int = 0
    notifications: int = 0
    discovered: int = 0
    latency_s: list[float] = field(default_factory=list)


class ControlBoard:
    """Shared per-device arrays (device order of the fleet)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.event = Controls.none(n)
        self.event_active = np.zeros(n, bool)
        self.default = Controls.none(n)
        self.last_contact = np.full(n, -np.inf)  # time.monotonic() of the last exchange
        self.silenced = np.zeros(n, bool)  # scenario: communication lost
        self.offline = np.zeros(n, bool)  # scenario: dropped out (no answer, no output)
        self.meas_epoch_s: int | None = None  # simulated time of the measurements
        self.site_p_w = np.zeros(n)  # import positive
        self.site_q_var = np.zeros(n)
        self.v_v = np.zeros(n)
        self.der_p_w = np.zeros(n)  # the device's own output (generating positive)
        self.der_q_var = np.zeros(n)
        #: feeder-head SCADA per phase (import positive), when the twin reports it
        self.head_p_w: np.ndarray | None = None
        self.head_q_var: np.ndarray | None = None
        self.counters = Counters()

    # --- agents ---------------------------------------------------------------------------
    def contact(self, i: int) -> None:
        self.last_contact[i] = time.monotonic()

    def set_event(self, i: int, limits: dict | None) -> None:
        with self.lock:
            if limits is None:
                self.event.set_row(i)
                self.event_active[i] = False
            else:
                self.event.set_row(i, **limits)
                self.event_active[i] = True

    def set_default(self, i: int, limits: dict | None) -> None:
        with self.lock:
            self.default.set_row(i, **(limits or {}))

    def measurements(self, i: int) -> tuple[int | None, float, float, float]:
        with self.lock:
            return (self.meas_epoch_s, float(self.site_p_w[i]), float(self.site_q_var[i]),
                    float(self.v_v[i]))

    def der_measurements(self, i: int) -> tuple[int | None, float, float]:
        """(time, output W, reactive output var) of device ``i`` (generating positive)."""
        with self.lock:
            return self.meas_epoch_s, float(self.der_p_w[i]), float(self.der_q_var[i])

    def head_measurements(self) -> tuple[int | None, np.ndarray | None, np.ndarray | None]:
        with self.lock:
            if self.head_p_w is None:
                return None, None, None
            return self.meas_epoch_s, self.head_p_w.copy(), self.head_q_var.copy()

    # --- physics loop ---------------------------------------------------------------------
    def effective(self, speed: float, comm_timeout_s: float) -> tuple[Controls, np.ndarray]:
        """The control each device applies now and which of them run on their default
        because their communication is lost (see :func:`effective_controls`); contact
        ages are converted to simulated seconds with ``speed``."""
        now = time.monotonic()
        with self.lock:
            age = (now - self.last_contact) * speed
            eff = effective_controls(self.event, self.event_active, self.default, age,
                                     comm_timeout_s)
            fallback = self.event_active & (age > comm_timeout_s)
            return eff, fallback

    def publish(self, epoch_s: int, site_p_w: np.ndarray, site_q_var: np.ndarray,
                v_v: np.ndarray, silenced: np.ndarray, offline: np.ndarray, *,
                der_p_w: np.ndarray | None = None, der_q_var: np.ndarray | None = None,
                head_p_w: np.ndarray | None = None, head_q_var: np.ndarray | None = None
                ) -> None:
        """The step's measurements, stamped ``epoch_s`` (simulated or wall-clock time, as
        the runner decides); the device outputs and head SCADA are optional."""
        with self.lock:
            if der_p_w is not None:
                self.der_p_w[:] = der_p_w
                self.der_q_var[:] = der_q_var if der_q_var is not None else 0.0
            if head_p_w is not None:
                self.head_p_w = np.asarray(head_p_w, float).copy()
                self.head_q_var = np.asarray(head_q_var, float).copy()
            self.meas_epoch_s = epoch_s
            self.site_p_w[:] = site_p_w
            self.site_q_var[:] = site_q_var
            self.v_v[:] = v_v
            self.silenced[:] = silenced
            self.offline[:] = offline
