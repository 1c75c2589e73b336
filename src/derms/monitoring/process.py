"""The monitoring cycle in its own process (what ``derms serve --monitor-period-s`` runs).

dss-python contexts created on more than one thread of a process crashed (see
docs/ARCHITECTURE.md). The server's threads therefore never touch an engine: a spawned
child process runs :class:`~derms.monitoring.cycle.MonitorLoop` (whose one loop thread is
the only engine user there) and sends every result back over a queue; a pump thread in
the server keeps the latest state and error per feeder for the API, with the same read
interface as the loop (``latest``, ``last_error``, ``runs``, ``monitors``,
``notify_topology_change``, ``close``). If the child dies, the server stays up and the
API answers that monitoring is not running for the feeders it lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading

from derms.monitoring.cycle import MonitorResults

log = logging.getLogger(__name__)


def _child(database_url: str, period_s: float, out_q, cmd_q) -> None:
    """Child process: build the monitors on the loop's thread, forward results, obey commands."""
    from derms.monitoring.cycle import MonitorLoop, monitors_from_store
    from derms.store.db import make_engine

    db = make_engine(database_url)
    loop = MonitorLoop(period_s=period_s, factory=lambda: monitors_from_store(db),
                       on_result=lambda fid, state, err: out_q.put((fid, state, err)),
                       discover=lambda known: monitors_from_store(db, known=known))
    loop.start()
    try:
        while True:
            cmd = cmd_q.get()
            if cmd[0] == "stop":
                break
            if cmd[0] == "topology":
                loop.notify_topology_change(cmd[1])
            elif cmd[0] == "models":
                loop.notify_models_changed()
    finally:
        loop.close()
        db.dispose()


class MonitorProcess:
    """Read side of a monitoring cycle running in a child process (see module docstring)."""

    def __init__(self, database_url: str, period_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._out, self._cmd = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_child, args=(database_url, period_s, self._out,
                                                      self._cmd), name="derms-monitor",
                                 daemon=True)
        self.results = MonitorResults()
        self.latest, self.last_error = self.results.latest, self.results.last_error
        self.runs, self.wait_for_runs = self.results.runs, self.results.wait_for_runs
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._receive, name="derms-monitor-pump",
                                      daemon=True)

    @property
    def monitors(self) -> set[str]:
        """Feeders with at least one result so far."""
        return self.results.feeders()

    def start(self) -> None:
        self._proc.start()
        self._pump.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                fid, state, err = self._out.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    log.error("monitor_process_died exitcode=%s", self._proc.exitcode)
                    return
                continue
            self.results.record(fid, state, err)

    def notify_topology_change(self, feeder_id: str) -> None:
        self._cmd.put(("topology", feeder_id))

    def notify_models_changed(self) -> None:
        """A feeder model was registered: the child looks for new feeders/versions now."""
        self._cmd.put(("models",))

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the child (its engines are closed by its loop thread) and the pump."""
        if self._proc.is_alive():
            self._cmd.put(("stop",))
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.terminate()
        self._stop.set()
        if self._pump.is_alive():
            self._pump.join(5)
        for q in (self._out, self._cmd):
            q.close()
            q.join_thread()
