"""Start the IEEE 2030.5 server: TLS context + resources + HTTP/1.1 transport in one call."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from derms.protocols.ieee2030_5.app import SepApp, SepSettings
from derms.protocols.ieee2030_5.http11 import Http11TlsServer, ServerThread
from derms.protocols.ieee2030_5.notify import SepNotifier, notify_ssl_context
from derms.protocols.ieee2030_5.repository import SepRepository
from derms.protocols.ieee2030_5.telemetry import ReadingSink
from derms.protocols.ieee2030_5.tls import server_ssl_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ieee2030_5Config:  # noqa: N801 - the standard's name
    """Where and how to listen. ``cert``/``key``: the server's PEM certificate and key;
    ``client_ca``: the CA (PEM) that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path
    host: str = "127.0.0.1"
    port: int = 8443
    max_body_bytes: int = 64 * 1024
    settings: SepSettings = field(default_factory=SepSettings)
    notify: bool = True  # deliver Notifications for subscriptions (see notify.SepNotifier)
    notify_period_s: float = 0.5
    #: controls that ended longer ago than this leave memory (a database-backed repository
    #: keeps them stored); checked at start and every ``prune_period_s``
    keep_ended_controls_s: float = 2 * 86_400.0
    prune_period_s: float = 3_600.0


def start_ieee2030_5_server(config: Ieee2030_5Config, repo: SepRepository,
                            telemetry: ReadingSink | None = None) -> ServerThread:
    """Start listening in a background thread; returns the running server (``.port``,
    ``.stop()``). ``telemetry``: where mirrored readings (and DER state of charge) are
    stored, e.g. a :class:`~derms.protocols.ieee2030_5.telemetry.StoreReadingSink`."""
    ctx = server_ssl_context(config.cert, config.key, config.client_ca)
    app = SepApp(repo, config.settings, telemetry=telemetry)
    server = Http11TlsServer(app, ctx, config.host, config.port,
                             max_body_bytes=config.max_body_bytes)
    thread = ServerThread(server)
    try:
        thread.start()
    except BaseException:
        thread.stop()  # e.g. the port is taken: leave no event loop thread behind
        raise
    janitor = ControlJanitor(repo, config.keep_ended_controls_s, config.prune_period_s)
    janitor.start()
    thread.companions.append(janitor)
    if config.notify:
        notifier = SepNotifier(app, notify_ssl_context(config.cert, config.key,
                                                       config.client_ca),
                               period_s=config.notify_period_s)
        notifier.start()
        thread.companions.append(notifier)
    return thread


class ControlJanitor:
    """Every ``period_s`` (and at start): ``repo.forget_controls_ended_before(now - keep_s)``,
    so the controls in memory stay bounded however long the server runs."""

    def __init__(self, repo: SepRepository, keep_s: float, period_s: float) -> None:
        self.repo, self.keep_s, self.period_s = repo, keep_s, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ieee2030_5-janitor",
                                        daemon=True)
        self.forgotten = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def run_once(self) -> int:
        forget = getattr(self.repo, "forget_controls_ended_before", None)
        if forget is None:
            return 0
        n = forget(datetime.now(UTC) - timedelta(seconds=self.keep_s))
        if n:
            log.info("event=ieee2030_5_controls_forgotten n=%d keep_s=%.0f", n, self.keep_s)
        self.forgotten += n
        return n

    def _run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # keep serving; the next period tries again
                log.exception("event=ieee2030_5_janitor_failed")
            if self._stop.wait(self.period_s):
                return
