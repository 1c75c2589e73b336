"""Transaction-scoped feeder locks: writes that depend on a feeder's model version
(registering a device or meter checked against it, registering a version, raising the
placement alarms of a version coming into force) take the feeder's lock first, so one
never reads a version another is about to change.

PostgreSQL: the feeders' rows ``SELECT … FOR UPDATE`` in id order (two transactions that
lock several feeders never deadlock), held until commit or rollback; other feeders are not
held up. SQLite: the database's write lock, taken by an ``UPDATE`` of the feeders' rows that
changes nothing (SQLite has one writer at a time, and under the pysqlite driver a
transaction begins only at its first write: reads before it are not part of it).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from derms.store.models import Feeder


def lock_feeders(session: Session, feeder_ids: Iterable[str | None]) -> None:
    """Hold ``feeder_ids`` (None ignored; an unknown id holds nothing on PostgreSQL) until
    ``session``'s transaction ends; reads after this see what the other holders wrote."""
    ids = sorted({f for f in feeder_ids if f is not None})
    if not ids:
        return
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Feeder).where(Feeder.feeder_id.in_(ids))
                        .values(feeder_id=Feeder.feeder_id)
                        .execution_options(synchronize_session=False))
    else:
        session.execute(select(Feeder.feeder_id).where(Feeder.feeder_id.in_(ids))
                        .order_by(Feeder.feeder_id).with_for_update())


__all__ = ["lock_feeders"]
