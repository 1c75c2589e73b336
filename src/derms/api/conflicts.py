"""Creates that check a key, then insert it: a repeat is answered as a repeat, also when two
requests create the same key at once.

Both requests read "not there" and both insert; the second insert breaks the key (on
PostgreSQL after waiting for the first to commit, on SQLite after waiting for its write
lock) and the database's uniqueness error used to be answered 500.
:func:`unique_transaction` rolls that transaction back and runs the write again: it now
reads what the other stored and answers as it would have second (409, or 200 for an
idempotent resend). Registrations checked against a feeder model do the same in
:func:`derms.api.placement.placement_transaction`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from derms.api.problems import Problem

log = logging.getLogger(__name__)

ATTEMPTS = 3  # transactions a create or registration may take before it answers 503
T = TypeVar("T")


def is_unique_violation(exc: IntegrityError) -> bool:
    """Whether the database refused a duplicate key (PostgreSQL SQLSTATE 23505; SQLite
    "UNIQUE constraint failed", primary keys included), not another integrity rule."""
    orig = exc.orig
    return getattr(orig, "sqlstate", None) == "23505" or \
        "UNIQUE constraint failed" in str(orig)


def unique_transaction(sessions: sessionmaker[Session], write: Callable[[Session], T],
                       what: str) -> T:
    """``write(session)`` in one transaction, committed when it returns; run again in a new
    one when its insert breaks a unique key (``write`` must read the key first and answer
    a repeat itself). 503 with ``Retry-After`` naming ``what`` when that keeps happening;
    other integrity errors propagate."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with sessions.begin() as s:
                return write(s)
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            log.warning("create_conflict what=%s attempt=%d error=%s", what, attempt,
                        str(exc.orig).splitlines()[0] if exc.orig else exc)
    raise Problem(503, f"{what}: other requests stored the same key meanwhile; nothing was "
                       "stored, send it again", headers={"Retry-After": "1"})


__all__ = ["ATTEMPTS", "is_unique_violation", "unique_transaction"]
