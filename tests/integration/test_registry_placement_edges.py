"""Edge cases of the registration placement check (derms.api.placement) and of the
placement alarms (derms.monitoring.placement), found by a review."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from derms.api import placement
from derms.api.app import create_app
from derms.config import get_settings
from derms.grid.elements import ModelElements
from derms.store.models import Alarm, FeederModelVersion
from derms.store.types import utcnow
from tests.integration.conftest import mint_token


@pytest.fixture
def api(db_url):
    app = create_app(get_settings(database_url=db_url))
    with TestClient(app) as client:
        yield app, client, mint_token(db_url, "admin")


def _dev(der_id: str, feeder_id: str | None, **kw) -> dict:
    return {"der_id": der_id, "site_id": f"s-{der_id}", "feeder_id": feeder_id,
            "der_type": "pv", "s_max_kva": 5.0, "p_gen_max_kw": 5.0, **kw}


def _feeder_with_version(app, c, admin, source_uri: str, elements=None) -> str:
    fid = f"rv-{uuid.uuid4().hex[:8]}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    with app.state.sessions.begin() as s:  # a version stored before 0009 (no elements)
        s.add(FeederModelVersion(feeder_id=fid, version=1, source_format="opendss",
                                 source_uri=source_uri, valid_from=utcnow(),
                                 elements=elements))
    return fid


def test_a_version_whose_model_file_is_gone_accepts_any_name(api, tmp_path):
    """The module docstring: a feeder "whose model file cannot be read any more (logged)"
    accepts any name. resolve_master raised InputError for the missing path first: every
    device registration on that feeder was refused with 422 "feeder file not found"."""
    app, c, admin = api
    fid = _feeder_with_version(app, c, admin, str(tmp_path / "gone" / "master.dss"))
    r = c.post("/v1/devices", headers=admin, json=_dev(f"d-{uuid.uuid4().hex[:6]}", fid,
                                                       bus="671"))
    assert r.status_code == 201, r.text


def test_a_model_that_cannot_be_inspected_is_not_compiled_again_per_request(
        api, tmp_path, monkeypatch):
    """A version without stored elements whose check fails (the file no longer compiles,
    or the child's answer cannot be read) was compiled again in a child process at every
    device or meter registration on the feeder (up to CHECK_TIMEOUT_S = 300 s each)."""
    app, c, admin = api
    master = tmp_path / "broken.dss"
    master.write_text("clear\nnew line.l1 bus1=a bus2=b\n")  # no circuit
    fid = _feeder_with_version(app, c, admin, str(master))
    calls = []
    real = placement.inspect_model_sync
    monkeypatch.setattr(placement, "inspect_model_sync",
                        lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    for k in range(3):
        r = c.post("/v1/devices", headers=admin,
                   json=_dev(f"d{k}-{uuid.uuid4().hex[:6]}", fid, bus="x"))
        assert r.status_code == 201, r.text
    assert len(calls) == 1, calls


def test_stored_elements_are_read_once_per_version(api, monkeypatch):
    """Every registration read the version's whole bus list from the store and rebuilt
    it (IEEE 8500: 4,876 buses, 114 kB of JSON; 13 -> 41 ms per single registration)."""
    app, c, admin = api
    el = ModelElements.from_names(["671.1", "671.2", "671.3"], ["xfm1"])
    fid = _feeder_with_version(app, c, admin, "ieee13", elements=el.to_json())
    calls = []
    real = ModelElements.from_json
    monkeypatch.setattr(ModelElements, "from_json",
                        classmethod(lambda cls, d: calls.append(1) or real(d)))
    for k in range(3):
        r = c.post("/v1/devices", headers=admin,
                   json=_dev(f"d{k}-{uuid.uuid4().hex[:6]}", fid, bus="671"))
        assert r.status_code == 201, r.text
    assert len(calls) == 1


def test_a_device_without_its_own_bus_is_checked_at_its_sites_bus(api):
    """A device on an existing site without a bus of its own sits at the site's bus (the
    control loop and the placement alarms read ``device.bus or site.bus``); its phase was
    not checked against that bus, so a phase the bus does not have was stored (201) and
    the loop skipped the device."""
    app, c, admin = api
    el = ModelElements.from_names(["652.1", "671.1", "671.2", "671.3"], ["xfm1"])
    fid = _feeder_with_version(app, c, admin, "ieee13", elements=el.to_json())
    u = uuid.uuid4().hex[:6]
    r = c.post("/v1/devices", headers=admin,
               json={**_dev(f"a-{u}", fid, bus="652", phase="a"), "site_id": f"site-{u}"})
    assert r.status_code == 201, r.text
    r = c.post("/v1/devices", headers=admin,
               json={**_dev(f"b-{u}", None, phase="b"), "site_id": f"site-{u}"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "body.phase"


def test_a_future_version_does_not_alarm_on_devices_the_version_in_force_places(api):
    """Registering a version whose valid_from is in the future raised placement_unknown
    alarms saying the device "is left out of monitoring and control" although the version
    in force (what monitoring and control use) places it."""
    app, c, admin = api
    fid = f"fut-{uuid.uuid4().hex[:6]}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    r = c.post(f"/v1/feeders/{fid}/models", headers=admin, json={"source_uri": "ieee13"})
    assert r.status_code == 201, r.text
    d = f"d-{uuid.uuid4().hex[:6]}"
    assert c.post("/v1/devices", headers=admin,
                  json=_dev(d, fid, bus="671")).status_code == 201
    later = (utcnow() + timedelta(days=30)).isoformat()
    r = c.post(f"/v1/feeders/{fid}/models", headers=admin,
               json={"source_uri": "ieee123", "valid_from": later})
    assert r.status_code == 201, r.text
    with app.state.sessions() as s:
        open_ = s.scalars(select(Alarm.message).where(Alarm.feeder_id == fid,
                                                      Alarm.t_cleared.is_(None))).all()
    assert open_ == [], open_
    assert "deferred_until" in r.json()["placement_alarms"]


def test_a_version_coming_into_force_raises_its_placement_alarms(api):
    """A version registered for later is checked when the monitor takes it up
    (monitors_from_store builds a monitor for the feeder's new version in force)."""
    from derms.monitoring.cycle import monitors_from_store

    app, c, admin = api
    fid = f"fut-{uuid.uuid4().hex[:6]}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    assert c.post(f"/v1/feeders/{fid}/models", headers=admin,
                  json={"source_uri": "ieee13"}).status_code == 201
    d = f"d-{uuid.uuid4().hex[:6]}"
    assert c.post("/v1/devices", headers=admin,
                  json=_dev(d, fid, bus="671")).status_code == 201
    later = (utcnow() + timedelta(days=30)).isoformat()
    assert c.post(f"/v1/feeders/{fid}/models", headers=admin,
                  json={"source_uri": "ieee123", "valid_from": later}).status_code == 201
    with app.state.sessions.begin() as s:  # the 30 days pass
        v2 = s.scalar(select(FeederModelVersion).where(FeederModelVersion.feeder_id == fid,
                                                       FeederModelVersion.version == 2))
        v2.valid_from = utcnow() - timedelta(seconds=1)
    db = app.state.engine
    with app.state.sessions() as s:  # every other feeder of the shared test database: as is
        rows = s.execute(select(FeederModelVersion.feeder_id,
                                func.max(FeederModelVersion.version))
                         .where(FeederModelVersion.valid_from <= utcnow())
                         .group_by(FeederModelVersion.feeder_id)).all()
    mons = monitors_from_store(db, known={f: v for f, v in rows} | {fid: 1})
    assert fid in mons and mons[fid].model_version == 2
    with app.state.sessions() as s:
        open_ = s.scalars(select(Alarm.kind).where(Alarm.feeder_id == fid,
                                                   Alarm.t_cleared.is_(None))).all()
    assert open_ == [f"placement_unknown:{d}"]
    for m in mons.values():
        m.close()


def test_a_model_without_transformers_has_none():
    """OpenDSS answers ``["NONE"]`` for the names of an empty collection: a model without
    transformers accepted the service transformer "none"."""
    el = ModelElements.from_names(["b1.1"], ["NONE"])
    assert el.transformers == frozenset()
    assert el.transformer_problem("none") is not None
