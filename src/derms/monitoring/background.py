"""One background thread with a condition to wake it and a clean stop (shared by the loops)."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Owns ``_cond`` (a Condition), ``_stop`` and ``_thread``; subclasses define ``_run``.

    ``_run`` must return when ``_stop`` is set (check it under ``_cond`` and wait on it);
    :meth:`stop` sets it, wakes the thread and joins it (work in progress finishes first).
    """

    thread_name = "derms-loop"

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self._lock = lock or threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None

    def _on_start(self) -> None:
        """Called under ``_cond`` just before the thread starts (e.g. queue a first run)."""

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            return
        with self._cond:
            self._stop = False
            self._on_start()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop and join the thread (a run in progress finishes first)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
