"""Alembic environment for derms.store; driven by :mod:`derms.store.migrate` (no alembic.ini).

The caller passes either an open connection (``config.attributes["connection"]``) or a URL
(``config.attributes["url"]``). SQLite runs with ``render_as_batch=True`` (table-copy
ALTERs).
"""

from __future__ import annotations

from alembic import context

from derms.store import commands as _commands  # noqa: F401 - registers control_commands
from derms.store import sep as _sep  # noqa: F401 - registers the sep_* tables in Base.metadata
from derms.store.db import make_engine
from derms.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("derms migrations run online only (derms.store.migrate.upgrade)")
run_migrations_online()
