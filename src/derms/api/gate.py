"""The request gate: checks every request can pass before any route reads its body.

* A write (POST, PUT, PATCH, DELETE) under ``/v1/`` without an ``Authorization`` header is
  answered 401 at once: FastAPI reads and parses a route's body before its dependencies
  run, so an anonymous client could otherwise make the server read (and hold) any body,
  and got 422 for a malformed one instead of 401.
* A write with a token that is unknown, revoked or malformed is answered 401, and one
  with a valid token lacking the route's scope 403 (the principal is left in the scope
  for :class:`derms.api.json_body.StrictJsonRoute`, which knows the route), also before
  the body is read (a malformed body with a wrong token or scope was a 422).
* A URL with a NUL character (``%00``) is answered 422 (PostgreSQL's text cannot hold one:
  a lookup by such an id was a 500).
* A body above ``max_body_bytes`` is answered 413: at once when ``Content-Length`` says
  so, else when the streamed body crosses the limit (the route's read then fails with
  that 413).

Both answers are problem+json, like every other error (:mod:`derms.api.problems`).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from derms.api.problems import PROBLEM, TYPE_BASE

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RequestGate:
    """ASGI middleware (see module docstring); ``max_body_bytes`` > 0."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.limit = app, int(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if "\x00" in path or b"%00" in scope.get("query_string", b"").lower():
            await _problem(send, path.replace("\x00", "%00"), 422,
                           "the request URL holds a NUL character (%00)")
            return
        if (scope.get("method") in _WRITES and path.startswith("/v1/")
                and not headers.get(b"authorization")):
            await _problem(send, path, 401, "missing Authorization header: send "
                           "'Authorization: Bearer <token>' (derms token create)",
                           [(b"www-authenticate", b'Bearer realm="derms"')])
            return
        if scope.get("method") in _WRITES and path.startswith("/v1/"):
            # an unknown, revoked or malformed token: 401 before the body is read (FastAPI
            # parses a body before dependencies: '{' with a wrong token was a 422, and a
            # wrong token could make the server read 32 MiB)
            from starlette.concurrency import run_in_threadpool

            from derms.api.auth import PRINCIPAL, authenticate
            from derms.api.problems import Problem
            lookup = getattr(getattr(scope.get("app"), "state", None), "token_lookup", None)
            if lookup is not None:
                value = headers.get(b"authorization", b"").decode("latin-1")
                try:
                    principal = await run_in_threadpool(authenticate, value, lookup)
                except Problem as exc:
                    await _problem(send, path, exc.status, exc.detail,
                                   [(b"www-authenticate", b'Bearer realm="derms"')])
                    return
                # the route's scope is checked before its body is read too, by
                # derms.api.json_body.StrictJsonRoute (403, not 422 for a malformed body)
                scope[PRINCIPAL] = principal
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _problem(send, path, 413, f"body of {int(declared)} bytes exceeds the "
                           f"limit of {self.limit} bytes")
            return
        seen = 0
        limit = self.limit

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


async def _problem(send: Send, path: str, status: int, detail: str,
                   extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    title = HTTPStatus(status).phrase
    body = json.dumps({"type": TYPE_BASE + title.lower().replace(" ", "-"), "title": title,
                       "status": status, "detail": detail, "instance": path}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM.encode()),
                            (b"content-length", str(len(body)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})
