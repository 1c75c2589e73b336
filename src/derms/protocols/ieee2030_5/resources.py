"""Shared pieces of the IEEE 2030.5 resource handlers: HTTP errors (with an ``Error`` body
when a reason code is given), sep+xml responses, list paging (§4.4: ``s`` start, ``l``
limit, ``a`` after) and the media-type check of incoming bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lxml import etree

from derms.protocols.ieee2030_5.http11 import Request, Response
from derms.protocols.ieee2030_5.sep_xml import MEDIA_TYPE, E, to_bytes

MAX_PAGE = 100


class HttpError(Exception):
    def __init__(self, status: int, reason_code: int | None = None, detail: str = "",
                 allow: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason_code, self.allow = status, reason_code, allow


def xml_response(el: etree._Element, status: int = 200) -> Response:
    return Response(status, to_bytes(el), MEDIA_TYPE)


def error_response(exc: HttpError) -> Response:
    headers = (("allow", exc.allow),) if exc.allow else ()
    if exc.reason_code is None:
        return Response(exc.status, headers=headers)
    return Response(exc.status, to_bytes(E("Error", E("reasonCode", exc.reason_code))),
                    MEDIA_TYPE, headers)


@dataclass(frozen=True)
class Page:
    start: int
    limit: int
    after: int | None


def page_of(query: dict[str, str]) -> Page:
    def num(name: str, default: int | None) -> int | None:
        text = query.get(name)
        if text is None:
            return default
        if not text.isdigit():
            raise HttpError(400, 0, f"query {name}={text!r}: expected a non-negative integer")
        return int(text)

    return Page(num("s", 0), min(num("l", 1), MAX_PAGE), num("a", None))


def require_sep_xml(request: Request) -> None:
    """415 unless the body is declared ``application/sep+xml``."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != MEDIA_TYPE:
        raise HttpError(415, detail=f"content type {content_type!r}")


def offloaded(work: Callable[[], Response]) -> Awaitable[Response]:
    """Run a handler's blocking part (a repository write that may reach the database) in a
    worker thread, off the listener's event loop; an HttpError it raises still answers."""
    async def run() -> Response:
        return await asyncio.to_thread(work)

    return run()
