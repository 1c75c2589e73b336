"""`derms token create` on a database that was never migrated: a message, exit 2."""

from __future__ import annotations

from typer.testing import CliRunner

from derms.cli.main import app


def test_token_create_before_db_upgrade_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DERMS_DATABASE_URL", raising=False)
    res = CliRunner().invoke(app, ["token", "create", "--scope", "admin"])
    assert res.exit_code == 2, res.output
    assert "derms db upgrade" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_token_create_on_an_unreachable_database_says_so(monkeypatch):
    """A PostgreSQL server that does not answer printed a traceback (review)."""
    monkeypatch.setenv("DERMS_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    res = CliRunner().invoke(app, ["token", "create", "--scope", "admin"])
    assert res.exit_code == 2, res.output
    assert "cannot open the database" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_db_upgrade_on_a_database_it_cannot_open_says_so(tmp_path, monkeypatch):
    """An unreachable server, a folder, a file that is no database: a traceback before."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(bytes(range(256)) * 12)
    (tmp_path / "folder").mkdir()
    for url in ("postgresql+psycopg://nobody@127.0.0.1:1/none",
                f"sqlite:///{tmp_path / 'folder'}", f"sqlite:///{junk}"):
        monkeypatch.setenv("DERMS_DATABASE_URL", url)
        res = CliRunner().invoke(app, ["db", "upgrade"])
        assert res.exit_code == 2, (url, res.output)
        assert "cannot open the database" in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
