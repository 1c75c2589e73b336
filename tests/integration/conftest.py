"""Databases for the integration tests: SQLite in a temporary folder and the real PostgreSQL
on 127.0.0.1:5432 (a fresh database ``derms_test_<random>`` per session, dropped afterwards;
skipped only if the server is unreachable)."""

from __future__ import annotations

import uuid

import pytest

from derms.store.migrate import upgrade

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_admin():
    psycopg = pytest.importorskip("psycopg")
    try:
        return psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test",
                               autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 unreachable: {exc}")


def pg_create() -> str:
    name = f"derms_test_{uuid.uuid4().hex[:12]}"
    with pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def pg_drop(name: str) -> None:
    with pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request):
    return request.param


@pytest.fixture(scope="session")
def db_url(backend, tmp_path_factory):
    """A migrated database per backend, shared by the tests of the session."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'derms.db'}"
        upgrade(url)
        yield url
        return
    name = pg_create()
    try:
        upgrade(pg_url(name))
        yield pg_url(name)
    finally:
        pg_drop(name)


def mint_token(url: str, scope: str) -> dict:
    """Store a new API token of ``scope`` in the database at ``url``; its auth header."""
    from derms.api.auth import mint_token as mint

    return {"Authorization": f"Bearer {mint(url, scope)}"}


@pytest.fixture
def empty_db_url(backend, tmp_path):
    """An empty, unmigrated database of the backend, for one test (migration tests)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'mig.db'}"
        return
    name = pg_create()
    try:
        yield pg_url(name)
    finally:
        pg_drop(name)
