"""Start the IEEE 2030.5 server: TLS context + resources + HTTP/1.1 transport in one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from derms.protocols.ieee2030_5.app import SepApp, SepSettings
from derms.protocols.ieee2030_5.http11 import Http11TlsServer, ServerThread
from derms.protocols.ieee2030_5.notify import SepNotifier, notify_ssl_context
from derms.protocols.ieee2030_5.repository import SepRepository
from derms.protocols.ieee2030_5.telemetry import ReadingSink
from derms.protocols.ieee2030_5.tls import server_ssl_context


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
    if config.notify:
        notifier = SepNotifier(app, notify_ssl_context(config.cert, config.key,
                                                       config.client_ca),
                               period_s=config.notify_period_s)
        notifier.start()
        thread.companions.append(notifier)
    return thread
