"""JSON request bodies decoded once, strictly, for every route with a body model.

FastAPI decodes a body with ``json.loads``: an object naming a field twice kept the last
(``{"feeder_id": "dupA", "feeder_id": "dupB"}`` registered ``dupB``). :class:`StrictJsonRoute`
decodes the body itself, as FastAPI would (a JSON content type, or none), refusing such an
object with a 422 naming the field, and hands the document to FastAPI (no second decode).
``/v1/readings`` reads its body itself and has its own check (``derms.ingest.parse``).

It also answers 403 before the body is read when the token the request gate authenticated
(:mod:`derms.api.gate`) lacks the route's scope.

Every router of the API is an ``APIRouter(route_class=StrictJsonRoute)``.
"""

from __future__ import annotations

import email.message
import json
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from derms.api.auth import PRINCIPAL, check_scope, scope_needed
from derms.api.problems import Problem
from derms.errors import InputError
from derms.ingest.parse import loads_unique


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # FastAPI decodes a body without a content type as JSON
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    sub = message.get_content_subtype()
    return sub == "json" or sub.endswith("+json")


def _keys(doc: Any) -> int:
    """Keys of every object in a decoded document."""
    n, stack = 0, [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            n += len(x)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


def decode(body: bytes) -> Any:
    """``json.loads(body)``, refusing an object that names a field twice (InputError);
    the text's encoding found as ``json.loads`` finds it (UTF-8, -16 or -32)."""
    enc = json.detect_encoding(body)
    text = body.decode(enc, "surrogatepass")
    return loads_unique(text, body if enc == "utf-8" else text.encode("utf-8", "surrogatepass"),
                        _keys)


class StrictJsonRoute(APIRoute):
    """An APIRoute whose JSON body is decoded by :func:`decode` (see module docstring)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        needed = scope_needed(self)

        async def strict(request: Request):
            principal = request.scope.get(PRINCIPAL)  # a write's, authenticated by the gate
            if needed is not None and principal is not None:
                # 403 before the body is read: FastAPI decodes and validates a body before
                # the route's dependencies run (a read token with '{' was a 422)
                check_scope(principal, needed)
            body = await request.body()
            if body and _is_json(request.headers.get("content-type")):
                try:
                    request._json = decode(body)  # Starlette's cache of request.json()
                except InputError as exc:
                    raise Problem(422, str(exc), errors=[{"field": "body",
                                                          "detail": str(exc)}]) from None
                except (ValueError, RecursionError):
                    pass  # not JSON: FastAPI's own decode answers as before
            return await handler(request)

        return strict
