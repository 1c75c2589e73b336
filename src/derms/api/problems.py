"""Every API error as RFC 9457 problem details (``application/problem+json``), in one place.

Domain exceptions are translated here and nowhere else: ``InputError`` → 422 (a batch's
row-level errors in ``errors``), ``ModelError`` → 404 when it names something unknown,
else 422; ``InfeasibleError`` → 409; ``ConvergenceError`` → 422; request validation → 422;
any unexpected exception → 500 without internals.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from derms.errors import (
    ConvergenceError,
    DermsError,
    InfeasibleError,
    InputError,
    ModelError,
    StoreUnavailable,
)
from derms.ingest.parse import BatchError

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
TYPE_BASE = "https://derms.invalid/problems/"


class Problem(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, type_: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.type_ = status, detail, type_
        self.headers, self.extra = headers, extra


def problem_response(request: Request, status: int, detail: str, *, type_: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """A problem+json response naming the request path as ``instance``."""
    title = HTTPStatus(status).phrase
    body = {"type": TYPE_BASE + (type_ or title.lower().replace(" ", "-")), "title": title,
            "status": status, "detail": detail, "instance": request.url.path, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _status_of(exc: DermsError) -> int:
    if isinstance(exc, StoreUnavailable):
        return 503
    if isinstance(exc, InfeasibleError):
        return 409
    if isinstance(exc, ModelError) and "unknown" in str(exc).lower():
        return 404
    if isinstance(exc, (InputError, ModelError, ConvergenceError)):
        return 422
    return 400


def allowed_methods(app: FastAPI, scope) -> str:
    """The methods some route serves at the request's path (RFC 9110 15.5.6: a 405 lists
    all the target's methods; Starlette names only the first route matching the path, so
    a path with a GET and a POST route answered "Allow: GET")."""
    ok = []
    for method in _METHODS:
        probe = {**scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in app.router.routes):
            ok.append(method)
    return ", ".join(ok)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(request, exc.status, exc.detail, type_=exc.type_,
                                headers=exc.headers, **exc.extra)

    @app.exception_handler(BatchError)
    async def _batch(request: Request, exc: BatchError):
        errors = [{"row": e.row, "field": e.field, "detail": e.detail} for e in exc.errors]
        return problem_response(request, 422, str(exc), type_="invalid-batch",
                                errors=errors, rows=exc.n_rows, accepted=0)

    @app.exception_handler(DermsError)
    async def _derms(request: Request, exc: DermsError):
        return problem_response(request, _status_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())), "detail": e.get("msg")}
                  for e in exc.errors()]
        return problem_response(request, 422, "request validation failed", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names the first matching route's methods
            headers = {**(headers or {}), "Allow": allowed_methods(app, request.scope)}
        return problem_response(request, exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError):  # the database refused a value: it
        # came from the request (every body field is bounded; this is the safety net)
        log.warning("api_data_error path=%s error=%s", request.url.path, exc.orig)
        return problem_response(request, 422, "a value does not fit its database column "
                                "(too long, out of range or not representable)")

    @app.exception_handler(StatementError)
    async def _statement(request: Request, exc: StatementError):
        # a column type refused a value while binding it (ensure_utc: year 1 at +05:00):
        # SQLAlchemy wraps the DermsError it raised; answer as that error
        if isinstance(exc.orig, DermsError):
            return problem_response(request, _status_of(exc.orig), str(exc.orig))
        log.error("api_unhandled path=%s error=%s", request.url.path, exc)
        return problem_response(request, 500, "internal error; see the server log")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("api_unhandled path=%s", request.url.path)
        return problem_response(request, 500, "internal error; see the server log")
