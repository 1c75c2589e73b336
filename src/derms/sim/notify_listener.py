"""An aggregator's notification endpoint (IEEE 2030.5 §9.2): an HTTPS listener with mutual
TLS where the DERMS POSTs Notifications for the subscriptions the aggregator made.

It presents the aggregator's own certificate (the server checks that the receiver's LFDI is
the subscriber's) and requires the server's certificate to chain to the CA. Each request is
``POST /notify/<device index>`` with an ``application/sep+xml`` Notification; it answers
201 and hands ``(device index, parsed Notification)`` to the callback on the same event
loop. Anything else gets 400/404/405; a handler error 500 (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import h11
from lxml import etree

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def listener_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class NotifyListener:
    """``await start()`` → port; ``on_notification(index, root_element)`` per POST."""

    def __init__(self, ctx: ssl.SSLContext, on_notification: Callable[[int, etree._Element],
                                                                       None],
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self._ctx, self._cb, self.host, self._port = ctx, on_notification, host, port
        self._server: asyncio.base_events.Server | None = None
        self.received = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def uri(self, index: int) -> str:
        return f"https://{self.host}:{self.port}/notify/{index}"

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self._port,
                                                  ssl=self._ctx)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req, body = None, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await asyncio.wait_for(reader.read(65536), 60)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        req = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            await self._answer(conn, writer, 413, close=True)
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                status = self._handle(req, bytes(body))
                await self._answer(conn, writer, status)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError, TimeoutError, ssl.SSLError):
            return
        finally:
            writer.close()

    def _handle(self, req: h11.Request, body: bytes) -> int:
        target = req.target.decode("latin-1").split("?")[0]
        parts = target.strip("/").split("/")
        if req.method != b"POST":
            return 405
        if len(parts) != 2 or parts[0] != "notify" or not parts[1].isdigit():
            return 404
        try:
            root = etree.fromstring(body, _PARSER)
        except etree.XMLSyntaxError:
            return 400
        if etree.QName(root).localname != "Notification":
            return 400
        try:
            self._cb(int(parts[1]), root)
        except Exception:  # noqa: BLE001 - answer 500, keep listening
            log.exception("event=sim_notification_failed target=%s", target)
            return 500
        self.received += 1
        return 201

    @staticmethod
    async def _answer(conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                      close: bool = False) -> None:
        headers = [("content-length", "0")] + ([("connection", "close")] if close else [])
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data += conn.send(h11.EndOfMessage())
        writer.write(data)
        await writer.drain()
