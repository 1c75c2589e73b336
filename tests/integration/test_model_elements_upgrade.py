"""Migration 0009 on a database with model versions registered before it: the column is
added (rows kept, elements null) and the first device registration on such a feeder works
out the elements once and stores them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import text

from derms.api.app import create_app
from derms.config import get_settings
from derms.store.db import make_engine
from derms.store.migrate import upgrade
from derms.store.types import UTCTimestamp
from tests.integration.conftest import mint_token


def test_upgrade_with_versions_registered_before_0009(empty_db_url):
    url = empty_db_url
    upgrade(url, "0008")
    eng = make_engine(url)
    fid = f"old-{uuid.uuid4().hex[:6]}"
    now = datetime(2024, 1, 1, tzinfo=UTC)
    feeders = sa.table("feeders", sa.column("feeder_id"), sa.column("name"),
                       sa.column("created_at", UTCTimestamp()))
    versions = sa.table("feeder_model_versions", sa.column("feeder_id"),
                        sa.column("version"), sa.column("source_format"),
                        sa.column("source_uri"), sa.column("valid_from", UTCTimestamp()),
                        sa.column("created_at", UTCTimestamp()))
    with eng.begin() as conn:
        conn.execute(feeders.insert().values(feeder_id=fid, name="", created_at=now))
        conn.execute(versions.insert().values(feeder_id=fid, version=1,
                                              source_format="opendss", source_uri="ieee13",
                                              valid_from=now, created_at=now))
    eng.dispose()
    upgrade(url)
    eng = make_engine(url)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT version, elements FROM feeder_model_versions "
                                 "WHERE feeder_id = :f"), {"f": fid}).all()
    eng.dispose()
    assert rows == [(1, None)]
    app = create_app(get_settings(database_url=url))
    admin = mint_token(url, "admin")
    with TestClient(app) as c:
        dev = {"der_id": "d1", "site_id": "s1", "feeder_id": fid, "der_type": "pv",
               "s_max_kva": 5.0, "p_gen_max_kw": 5.0, "bus": "999"}
        r = c.post("/v1/devices", headers=admin, json=dev)
        assert r.status_code == 422, r.text
        r = c.post("/v1/devices", headers=admin, json={**dev, "bus": "671"})
        assert r.status_code == 201, r.text
    eng = make_engine(url)
    with eng.connect() as conn:
        el = conn.execute(text("SELECT elements FROM feeder_model_versions "
                               "WHERE feeder_id = :f"), {"f": fid}).scalar()
    eng.dispose()
    assert el is not None
