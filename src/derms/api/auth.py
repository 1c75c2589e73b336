"""API tokens with scopes: ``read`` < ``operate`` < ``admin`` (each includes the ones before).

A token is ``derms_<id>_<secret>``; only ``sha256(secret)`` is stored, with its scopes.
Requests carry ``Authorization: Bearer <token>``. Missing or malformed → 401 (with
``WWW-Authenticate``), unknown or revoked → 401, insufficient scope → 403; there are no
anonymous writes (every route but health, readiness and metrics needs a token).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from derms.api.problems import Problem

SCOPES = ("read", "operate", "admin")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored token: public id, secret hash, scope, revoked flag."""

    token_id: str
    secret_sha256: str
    scope: str
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: token id and its scope."""

    token_id: str
    scope: str

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


def new_token(scope: str) -> tuple[str, TokenRecord]:
    """Mint a token: the plain text (shown once) and the record to store."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    record = TokenRecord(token_id, hashlib.sha256(secret.encode()).hexdigest(), scope)
    return f"derms_{token_id}_{secret}", record


def mint_token(database_url: str, scope: str, name: str = "") -> str:
    """Mint a token and store its record (hash only) in the database at ``database_url``;
    returns the plain text, shown once (``derms token create``, the demo, tests)."""
    from derms.store.db import make_engine, make_session_factory
    from derms.store.models import ApiToken

    text, rec = new_token(scope)
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine).begin() as s:
            s.add(ApiToken(token_id=rec.token_id, secret_sha256=rec.secret_sha256,
                           scope=scope, name=name))
    finally:
        engine.dispose()
    return text


def _parse(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "derms" or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def authenticate(header: str | None, lookup: Callable[[str], TokenRecord | None]) -> Principal:
    """The principal for an ``Authorization`` header value (raises 401 problems)."""
    challenge = {"WWW-Authenticate": 'Bearer realm="derms"'}
    if not header or not header.lower().startswith("bearer "):
        raise Problem(401, "missing bearer token", headers=challenge)
    parsed = _parse(header[7:].strip())
    if parsed is None:
        raise Problem(401, "malformed token", headers=challenge)
    record = lookup(parsed[0])
    digest = hashlib.sha256(parsed[1].encode()).hexdigest()
    if record is None or record.revoked or not hmac.compare_digest(digest, record.secret_sha256):
        raise Problem(401, "unknown or revoked token", headers=challenge)
    return Principal(record.token_id, record.scope)


PRINCIPAL = "derms.principal"
"""The ASGI scope key of a write's Principal, authenticated by the request gate before the
body is read (:mod:`derms.api.gate`); :func:`require` takes it instead of a second lookup."""


def check_scope(principal: Principal, scope: str) -> None:
    """403 (a Problem) unless ``principal`` has at least ``scope``."""
    if not principal.allows(scope):
        raise Problem(403, f"token scope {principal.scope!r} does not allow {scope!r}")


def require(scope: str):
    """FastAPI dependency: the caller's :class:`Principal`, with at least ``scope``."""

    def dependency(request: Request) -> Principal:
        principal = request.scope.get(PRINCIPAL)
        if principal is None:
            lookup = request.app.state.token_lookup
            principal = authenticate(request.headers.get("authorization"), lookup)
        check_scope(principal, scope)
        return principal

    dependency.scope_needed = scope  # read by the request gate (403 before the body is read)
    return dependency


def scope_needed(route) -> str | None:
    """The highest scope a route's :func:`require` dependencies need (None: no token
    needed, or not a FastAPI route)."""
    found: list[str] = []
    stack = [getattr(route, "dependant", None)]
    while stack:
        dep = stack.pop()
        if dep is None:
            continue
        needed = getattr(dep.call, "scope_needed", None)
        if needed in SCOPES:
            found.append(needed)
        stack.extend(dep.dependencies)
    return max(found, key=SCOPES.index) if found else None
