"""Envelope sets in the store (SQLite and PostgreSQL): migration 0005 matches the model
and goes down and up; a set is written in bulk and read back exactly; bad input."""

from __future__ import annotations

import pandas as pd
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from derms.errors import InputError
from derms.store.db import make_engine
from derms.store.envelopes import (
    delete_envelope_set,
    envelope_set,
    list_envelope_sets,
    save_envelope_set,
)
from derms.store.migrate import current_revision, downgrade, head_revision, upgrade
from derms.store.models import Base


def test_migration_0005_matches_the_model_and_goes_down_and_up(empty_db_url):
    url = empty_db_url
    upgrade(url)
    eng = make_engine(url)
    with eng.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "envelope_" in repr(d)] == []
    downgrade(url, "0004")
    assert "envelope_sets" not in inspect(eng).get_table_names()
    upgrade(url)
    assert current_revision(url) == head_revision()
    eng.dispose()


def test_set_round_trip(db_url):
    eng = make_engine(db_url)
    t = pd.date_range("2026-07-01", periods=3, freq="5min", tz="UTC")
    table = pd.DataFrame({
        "connection_point": ["a", "b"] * 3, "bus": ["1", "2"] * 3, "phase": ["1", "2"] * 3,
        "timestamp": t.repeat(2), "export_limit_kw": [1.5, 2.0, 1.25, 2.0, 0.0, 3.0],
        "import_limit_kw": [float("nan")] * 6})
    sid = save_envelope_set(eng, feeder="f-test", policy="equal", table=table,
                            summary={"runtime_s": 1.0})
    info, values = envelope_set(eng, sid)
    assert info["n_intervals"] == 3 and info["n_connection_points"] == 2 and info["step_s"] == 300
    assert info["summary"] == {"runtime_s": 1.0} and info["start"].startswith("2026-07-01T00:00")
    assert values["export_limit_kw"].tolist() == [1.5, 2.0, 1.25, 2.0, 0.0, 3.0]
    assert values["import_limit_kw"].isna().all()  # a direction not computed stays null
    assert (values["timestamp"] == t.repeat(2)).all()
    total, items = list_envelope_sets(eng, "f-test")
    assert total >= 1 and items[0]["id"] == sid
    assert delete_envelope_set(eng, sid) and envelope_set(eng, sid) is None
    with pytest.raises(InputError, match="missing columns"):
        save_envelope_set(eng, feeder="f", policy="equal", table=table.drop(columns="timestamp"),
                          summary={})
    with pytest.raises(InputError, match="no rows"):
        save_envelope_set(eng, feeder="f", policy="equal", table=table.iloc[0:0], summary={})
    eng.dispose()
