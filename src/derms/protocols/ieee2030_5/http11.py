"""A small HTTP/1.1 server over mutual TLS whose handler sees the client certificate.

Why not uvicorn/hypercorn: neither hands the peer certificate to the ASGI app (DESIGN.md,
known traps), and the identity must come from the TLS connection, never from a header. Rather
than patch a server's protocol class (private API that changes between releases), this module
owns the whole path, which is short: a plain ``asyncio.start_server`` TCP listener, TLS done
here through ``SSLContext.wrap_bio`` (memory BIOs), h11 for HTTP/1.1 parsing and keep-alive,
and one synchronous handler call per request with a :class:`Request` whose ``client`` is
computed from ``getpeercert(binary_form=True)`` of the connection's SSL object, once per
connection.

Why TLS through memory BIOs rather than ``start_server(ssl=…)``: asyncio's SSL transport drops
the connection on a failed handshake without sending the alert OpenSSL produced, so a client
with a certificate from another CA, or an expired one, saw only an EOF. Here the pending
output is flushed first, so the client gets the TLS alert (unknown_ca, certificate_expired,
…) as the standard's peers expect, before any HTTP is exchanged.

The handler runs on the event loop and must not block; one with blocking work returns an
awaitable (see ``Handler``), which is awaited before the response is sent.

Limits: bodies above ``max_body_bytes`` get 413 and the connection is closed; an idle
keep-alive connection is closed after ``idle_timeout_s``; a handler exception becomes a bare
500 (logged, no stack trace on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11

from derms.protocols.ieee2030_5.identity import ClientIdentity

log = logging.getLogger(__name__)

REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
           413: "Content Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    client: ClientIdentity


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=())


#: called on the event loop: it must not block; a handler that has blocking work (a database
#: write) returns an awaitable that runs it off the loop (``asyncio.to_thread``)
Handler = Callable[[Request], Response | Awaitable[Response]]


class _Close(Exception):
    """End the connection (peer gone, protocol error already answered, or timeout)."""


class _TlsStream:
    """Server-side TLS over an asyncio stream through memory BIOs (alerts are flushed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ctx: ssl.SSLContext) -> None:
        self._reader, self._writer = reader, writer
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._in, self._out, server_side=True)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self, timeout_s: float) -> bool:
        try:
            data = await asyncio.wait_for(self._reader.read(65536), timeout_s)
        except TimeoutError:
            raise _Close from None
        if not data:
            return False
        self._in.write(data)
        return True

    async def handshake(self, timeout_s: float, offload: bool = True) -> None:
        """Complete the TLS handshake. ``offload``: run each handshake step that has peer data
        to process in a worker thread — its public-key operations (ECDHE, ECDSA signing and
        the client certificate's verification) release the GIL, so requests on the
        connections already open are served meanwhile instead of queueing behind a burst of
        new connections."""
        fresh = True
        while True:
            try:
                if offload and not fresh:
                    await asyncio.to_thread(self.ssl.do_handshake)
                else:
                    self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill(timeout_s):
                    raise _Close from None
                fresh = False
                continue
            except ssl.SSLError:
                with contextlib.suppress(Exception):
                    await self._flush()  # the alert
                raise
            await self._flush()
            return

    async def recv(self, timeout_s: float) -> bytes:
        """Decrypted bytes; b"" when the peer closed."""
        while True:
            try:
                data = self.ssl.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill(timeout_s):
                    return b""
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            await self._flush()
            return data

    async def send(self, data: bytes) -> None:
        self.ssl.write(data)
        await self._flush()


class Http11TlsServer:
    """Serve ``handler`` over HTTPS with client certificates on ``host:port`` (0: any port)."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext, host: str = "127.0.0.1",
                 port: int = 0, *, max_body_bytes: int = 64 * 1024, idle_timeout_s: float = 60.0,
                 handshake_timeout_s: float = 10.0, offload_handshakes: bool = True) -> None:
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the IEEE 2030.5 server needs an SSL context that requires "
                             "client certificates")
        self._handler = handler
        self._ssl = ssl_context
        self._host, self._port = host, port
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        self.offload_handshakes = offload_handshakes
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._port, limit=2**16)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        tls = _TlsStream(reader, writer, self._ssl)
        try:
            try:
                await asyncio.wait_for(tls.handshake(self.idle_timeout_s,
                                                     self.offload_handshakes),
                                       self._handshake_timeout_s)
            except ssl.SSLError as exc:
                log.info("event=ieee2030_5_handshake_failed peer=%s reason=%s",
                         writer.get_extra_info("peername"), exc.reason)
                raise _Close from None
            der = tls.ssl.getpeercert(binary_form=True)
            if der is None:  # cannot happen with CERT_REQUIRED; never serve without identity
                raise _Close
            client = ClientIdentity.from_cert_der(der)
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
            while True:
                await self._one_request(conn, tls, client)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (_Close, ConnectionError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 - a connection must never take the server down
            log.exception("event=ieee2030_5_connection_error")
        finally:
            writer.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _next_event(self, conn: h11.Connection, tls: _TlsStream):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await tls.recv(self.idle_timeout_s))

    async def _one_request(self, conn: h11.Connection, tls: _TlsStream,
                           client: ClientIdentity) -> None:

        try:
            event = await self._next_event(conn, tls)
            if isinstance(event, h11.ConnectionClosed):
                raise _Close
            if not isinstance(event, h11.Request):
                raise _Close
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key = name.decode("latin-1").lower()
                val = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {val}" if key in headers else val
            length = headers.get("content-length")
            if length is not None and int(length) > self.max_body_bytes:
                await self._send(conn, tls, Response(413), close=True)
                return
            if conn.they_are_waiting_for_100_continue:  # "Expect: 100-continue" (curl and
                # many HTTP stacks for POST/PUT): answered, or the client waits ~1 s first
                await tls.send(conn.send(h11.InformationalResponse(status_code=100,
                                                                   headers=[])))
            body = bytearray()
            while True:
                part = await self._next_event(conn, tls)
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > self.max_body_bytes:
                        await self._send(conn, tls, Response(413), close=True)
                        return
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    raise _Close
        except h11.RemoteProtocolError:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send(conn, tls, Response(400), close=True)
            raise _Close from None
        target = urlsplit(event.target.decode("latin-1"))
        method = event.method.decode("ascii")
        head = method == "HEAD"  # answered as GET without the body (RFC 9110 9.3.2)
        request = Request(method="GET" if head else method, path=target.path or "/",
                          query=dict(parse_qsl(target.query, keep_blank_values=True)),
                          headers=headers, body=bytes(body), client=client)
        try:
            response = self._handler(request)
            if inspect.isawaitable(response):
                response = await response
        except Exception:  # noqa: BLE001 - answer 500 without a trace on the wire
            log.exception("event=ieee2030_5_handler_error method=%s path=%s lfdi=%s",
                          request.method, request.path, client.lfdi)
            response = Response(500)
        await self._send(conn, tls, response, close=False, head=head)

    async def _send(self, conn: h11.Connection, writer: _TlsStream,
                    response: Response, *, close: bool, head: bool = False) -> None:
        headers = [("content-length", str(len(response.body))), ("server", "derms")]
        if response.content_type:
            headers.append(("content-type", response.content_type))
        headers += list(response.headers)
        if close:
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                      reason=REASONS.get(response.status, "").encode()))
        if response.body and not head:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await writer.send(data)


class ServerThread:
    """Run an :class:`Http11TlsServer` on its own event loop in a daemon thread (for
    ``derms serve`` next to uvicorn, and for tests)."""

    def __init__(self, server: Http11TlsServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="ieee2030_5-server", daemon=True)
        #: stopped with the server (e.g. the notifier), in reverse order
        self.companions: list = []

    def start(self) -> int:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        for companion in reversed(self.companions):
            with contextlib.suppress(Exception):
                companion.stop()
        self.companions.clear()
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
