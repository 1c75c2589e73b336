"""A registration that has to run again too often is answered 503, not 500 or a wait.

``placement_transaction`` (``derms.api.placement``) runs a registration again when its
check meets model versions whose elements are not stored yet (worked out outside the
transaction) and when its insert meets ids or sites another request stored meanwhile.
After ``ATTEMPTS`` it answers 503 problem+json with ``Retry-After`` (a transient state:
the client sends it again); nothing is stored. Neither path had a test.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from derms.api import placement, routes_registry
from derms.api.app import create_app
from derms.config import get_settings
from derms.grid.elements import ModelElements
from derms.store.models import DerDevice, DerSite, FeederModelVersion, Meter
from derms.store.types import utcnow
from tests.integration.conftest import mint_token

IEEE13 = ModelElements.from_names(["650.1", "650.2", "650.3", "671.1", "671.2", "671.3"],
                                  ["xfm1"])
ROUTES = ["devices", "devices/batch", "meters", "meters/batch"]


@pytest.fixture
def api(db_url):
    app = create_app(get_settings(database_url=db_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client, mint_token(db_url, "admin")


def _body(route: str, ids: list[str], feeder_id: str | None) -> dict:
    if route.startswith("devices"):
        rows = [{"der_id": i, "site_id": f"s-{i}", "feeder_id": feeder_id, "der_type": "pv",
                 "s_max_kva": 5.0, "p_gen_max_kw": 5.0, "bus": "671"} for i in ids]
        return {"devices": rows} if route.endswith("batch") else rows[0]
    rows = [{"meter_id": i, "feeder_id": feeder_id, "bus": "671"} for i in ids]
    return {"meters": rows} if route.endswith("batch") else rows[0]


def _is_503_to_send_again(r, cause: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "1"
    p = r.json()
    assert p["status"] == 503 and p["instance"].startswith("/v1/")
    assert cause in p["detail"] and "nothing was stored, send it again" in p["detail"]


def _stored(app, ids: list[str]) -> int:
    with app.state.sessions() as s:
        return sum(s.scalar(select(func.count()).select_from(m).where(col.in_(ids)))
                   for m, col in ((DerDevice, DerDevice.der_id), (Meter, Meter.meter_id)))


@pytest.mark.parametrize("route", ROUTES)
def test_versions_without_elements_at_every_attempt(api, monkeypatch, route):
    """Each time the elements of the version in force are worked out, a newer version
    without them comes into force (a hook on the backfill registers it)."""
    app, c, admin = api
    fid = f"att-{uuid.uuid4().hex[:8]}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201

    def add_version(version: int) -> None:  # stored without elements, in force now
        with app.state.sessions.begin() as s:
            s.add(FeederModelVersion(feeder_id=fid, version=version, source_format="opendss",
                                     source_uri="ieee13",
                                     valid_from=utcnow() - timedelta(seconds=1)))

    add_version(1)
    worked_out: list[int] = []

    def backfill(_sessions, v) -> dict:
        worked_out.append(v.version)
        add_version(v.version + 1)
        return IEEE13.to_json()

    monkeypatch.setattr(placement, "_backfill", backfill)
    ids = [f"x-{uuid.uuid4().hex[:6]}"]
    r = c.post(f"/v1/{route}", headers=admin, json=_body(route, ids, fid))
    _is_503_to_send_again(r, "model versions changed")
    assert worked_out == [1, 2, 3] and placement.ATTEMPTS == 3
    assert _stored(app, ids) == 0


@pytest.mark.parametrize("route", ["devices/batch", "meters/batch"])
def test_ids_stored_by_others_at_every_attempt(api, monkeypatch, route):
    """After each attempt's check, another request stores one more of the batch's new ids
    (and its site). A single registration cannot meet this twice: run again, it reads its
    id or site as taken."""
    app, c, admin = api
    u = uuid.uuid4().hex[:6]
    ids = [f"y{k}-{u}" for k in range(placement.ATTEMPTS + 1)]  # the last: no one else's
    real = routes_registry.check_placement
    attempts: list[int] = []

    def hooked(*args, **kwargs):
        out = real(*args, **kwargs)
        k = len(attempts)
        attempts.append(k)
        with app.state.sessions.begin() as other:  # committed before this insert
            if route.startswith("devices"):
                other.add(DerSite(site_id=f"s-{ids[k]}"))
                other.flush()
                other.add(DerDevice(der_id=ids[k], site_id=f"s-{ids[k]}", der_type="pv",
                                    s_max_kva=5.0))
            else:
                other.add(Meter(meter_id=ids[k]))
        return out

    monkeypatch.setattr(routes_registry, "check_placement", hooked)
    r = c.post(f"/v1/{route}", headers=admin, json=_body(route, ids, None))
    _is_503_to_send_again(r, "stored the same ids or sites meanwhile")
    assert len(attempts) == placement.ATTEMPTS
    assert _stored(app, ids) == placement.ATTEMPTS  # the others' rows, not the last
