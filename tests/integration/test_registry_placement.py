"""Devices and meters registered on a feeder with a model must sit on that model: a bus,
phase or service transformer the model does not have is a 422 problem+json naming the
field, the value and (in a batch) the row; before, they were stored and the control loop
and the monitor skipped them without a word. A feeder without a model accepts any name."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from derms.api.app import create_app
from derms.config import get_settings
from derms.grid.elements import ModelElements
from derms.store.db import make_session_factory
from derms.store.models import Feeder, FeederModelVersion
from tests.integration.conftest import mint_token

PROBLEM = "application/problem+json"


@pytest.fixture
def api(db_url):
    app = create_app(get_settings(database_url=db_url))
    with TestClient(app) as client:
        yield app, client, mint_token(db_url, "admin")


def _problem(r, status: int = 422) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    return r.json()


def _dev(der_id: str, feeder_id: str | None, **kw) -> dict:
    return {"der_id": der_id, "site_id": f"s-{der_id}", "feeder_id": feeder_id,
            "der_type": "pv", "s_max_kva": 5.0, "p_gen_max_kw": 5.0, **kw}


def _elements(app, fid: str) -> dict | None:
    with app.state.sessions() as s:
        return s.scalar(select(FeederModelVersion.elements)
                        .where(FeederModelVersion.feeder_id == fid))


def test_unit_model_elements_accept_the_forms_the_code_reads():
    el = ModelElements.from_names(["671.1", "671.2", "671.3", "652.1", "sourcebus.1"],
                                  ["XFM1", "reg1"])
    assert el.bus_problem("671") is None and el.bus_problem(" 671.1.2 ") is None
    assert el.bus_problem("671.0") is None  # ground
    assert "no bus '999'" in el.bus_problem("999")
    assert "'4' is not a node of bus '671'" in el.bus_problem("671.4")
    assert el.phase_problem("652", "abc") is None  # the loop takes the node the bus has
    assert "none of its nodes" in el.phase_problem("652", "b")
    assert el.transformer_problem("xfm1") is None
    assert el.transformer_problem("Transformer.XFM1") is None
    assert "no transformer 'nosuch'" in el.transformer_problem("nosuch")
    assert ModelElements.from_json(el.to_json()) == el


def test_registration_is_checked_against_the_feeder_model(api):
    app, c, admin = api
    u = uuid.uuid4().hex[:6]
    bare, fid = f"bare-{u}", f"f13-{u}"
    for f in (bare, fid):
        assert c.post("/v1/feeders", headers=admin, json={"feeder_id": f}).status_code == 201
    # no model yet: any name is accepted (nothing to check against)
    r = c.post("/v1/devices", headers=admin, json=_dev(f"d0-{u}", bare, bus="nosuch"))
    assert r.status_code == 201, r.text
    r = c.post(f"/v1/feeders/{fid}/models", headers=admin, json={"source_uri": "ieee13"})
    assert r.status_code == 201, r.text
    stored = _elements(app, fid)  # stored with the version: no compile per registration
    assert stored is not None and stored["buses"]["671"] == [1, 2, 3]
    assert "xfm1" in stored["transformers"]

    # -- single device ------------------------------------------------------------------
    p = _problem(c.post("/v1/devices", headers=admin, json=_dev(f"d1-{u}", fid, bus="999")))
    assert p["errors"] == [{"field": "body.bus", "value": "999", "detail": p["errors"][0][
        "detail"]}]
    assert "'999'" in p["detail"] and fid in p["detail"] and "version 1" in p["detail"]
    assert c.get(f"/v1/devices/d1-{u}", headers=admin).status_code == 404
    p = _problem(c.post("/v1/devices", headers=admin, json=_dev(f"d1-{u}", fid, bus="671.4")))
    assert p["errors"][0]["field"] == "body.bus" and p["errors"][0]["value"] == "671.4"
    p = _problem(c.post("/v1/devices", headers=admin,
                        json=_dev(f"d1-{u}", fid, bus="652", phase="b")))
    assert p["errors"][0]["field"] == "body.phase" and p["errors"][0]["value"] == "b"
    p = _problem(c.post("/v1/devices", headers=admin,
                        json=_dev(f"d1-{u}", fid, bus="671", service_transformer="t9")))
    assert p["errors"][0]["field"] == "body.service_transformer"
    r = c.post("/v1/devices", headers=admin,
               json=_dev(f"d1-{u}", fid, bus=" RG60 ", service_transformer="XFM1"))
    assert r.status_code == 201, r.text
    assert r.json()["bus"] == "rg60" and r.json()["service_transformer"] == "xfm1"
    r = c.post("/v1/devices", headers=admin, json=_dev(f"d2-{u}", fid, bus="671.1.2",
                                                       phase="ab"))
    assert r.status_code == 201, r.text
    # a device on an existing site (no feeder_id given) is checked on the site's feeder
    p = _problem(c.post("/v1/devices", headers=admin, json={
        **_dev(f"d3-{u}", None, bus="nosuch"), "site_id": f"s-d1-{u}"}))
    assert p["errors"][0]["value"] == "nosuch"

    # -- device batch: every bad row named, nothing stored ------------------------------
    rows = [_dev(f"b0-{u}", fid, bus="675"), _dev(f"b1-{u}", fid, bus="nosuch"),
            _dev(f"b2-{u}", fid, bus="680", service_transformer="nosuch")]
    p = _problem(c.post("/v1/devices/batch", headers=admin, json={"devices": rows}))
    assert [(e["row"], e["field"], e["value"]) for e in p["errors"]] == [
        (1, "bus", "nosuch"), (2, "service_transformer", "nosuch")]
    assert "row 1" in p["detail"]
    assert c.get(f"/v1/devices/b0-{u}", headers=admin).status_code == 404
    r = c.post("/v1/devices/batch", headers=admin, json={"devices": rows[:1]})
    assert r.status_code == 201 and r.json()["created"] == [f"b0-{u}"]

    # -- meters, single and batch ---------------------------------------------------------
    m = {"meter_id": f"m0-{u}", "feeder_id": fid, "bus": "611", "phase": "a"}
    p = _problem(c.post("/v1/meters", headers=admin, json=m))  # 611 has phase c only
    assert p["errors"][0]["field"] == "body.phase"
    assert c.post("/v1/meters", headers=admin, json={**m, "phase": "c"}).status_code == 201
    meters = [{"meter_id": f"m1-{u}", "feeder_id": fid, "bus": "634", "phase": "abc"},
              {"meter_id": f"m2-{u}", "feeder_id": fid, "bus": "6340", "phase": "a"}]
    p = _problem(c.post("/v1/meters/batch", headers=admin, json={"meters": meters}))
    assert [(e["row"], e["field"], e["value"]) for e in p["errors"]] == [(1, "bus", "6340")]
    r = c.post("/v1/meters/batch", headers=admin, json={"meters": meters[:1]})
    assert r.status_code == 201, r.text


def test_a_version_stored_without_elements_gets_them_once(api):
    """A version written before migration 0009 (or straight into the store) has no stored
    elements: the first check works them out in a child process and keeps them."""
    app, c, admin = api
    fid = f"f13old-{uuid.uuid4().hex[:6]}"
    with make_session_factory(app.state.engine).begin() as s:
        s.add(Feeder(feeder_id=fid))
        s.flush()
        s.add(FeederModelVersion(feeder_id=fid, version=1, source_uri="ieee13"))
    assert _elements(app, fid) is None
    p = _problem(c.post("/v1/meters", headers=admin,
                        json={"meter_id": f"m-{fid}", "feeder_id": fid, "bus": "nosuch"}))
    assert p["errors"][0]["field"] == "body.bus"
    assert _elements(app, fid)["buses"]["652"] == [1]


def test_a_new_model_version_raises_alarms_for_what_it_cannot_place(api, tmp_path):
    """Devices and meters registered before the feeder had a model (any name accepted)
    and left out by a new version get a ``placement_unknown`` alarm each when the version
    is registered (they were skipped by the loop and the monitor without a word); a later
    version that has the bus clears it."""
    from derms.grid.bundled import resolve_master

    _app, c, admin = api
    u = uuid.uuid4().hex[:6]
    fid = f"f13a-{u}"
    assert c.post("/v1/feeders", headers=admin, json={"feeder_id": fid}).status_code == 201
    devices = [_dev(f"ok-{u}", fid, bus="671"), _dev(f"bad-{u}", fid, bus="extra")]
    assert c.post("/v1/devices/batch", headers=admin,
                  json={"devices": devices}).status_code == 201
    meters = [{"meter_id": f"m-ok-{u}", "feeder_id": fid, "bus": "652", "phase": "a"},
              {"meter_id": f"m-bad-{u}", "feeder_id": fid, "bus": "652", "phase": "b"}]
    assert c.post("/v1/meters/batch", headers=admin, json={"meters": meters}).status_code == 201

    def open_alarms():
        items = c.get("/v1/alarms", headers=admin,
                      params={"open": "true", "feeder_id": fid}).json()["items"]
        return {(a["kind"], a["der_id"], a["meter_id"]) for a in items}

    r = c.post(f"/v1/feeders/{fid}/models", headers=admin, json={"source_uri": "ieee13"})
    assert r.status_code == 201, r.text
    assert r.json()["placement_alarms"] == {"raised": 2, "cleared": 0, "open": 2}
    assert open_alarms() == {(f"placement_unknown:bad-{u}", f"bad-{u}", None),
                             (f"placement_unknown:m-bad-{u}", None, f"m-bad-{u}")}
    r = c.post(f"/v1/feeders/{fid}/models", headers=admin, json={"source_uri": "ieee13"})
    assert r.json()["placement_alarms"] == {"raised": 0, "cleared": 0, "open": 2}
    # a version with bus "extra": the device's alarm clears, the meter's stays
    master = tmp_path / "Master.dss"
    master.write_text(f"Redirect {resolve_master('ieee13')}\n"
                      "New Line.extra phases=3 bus1=671 bus2=extra length=0.01 units=km\n")
    r = c.post(f"/v1/feeders/{fid}/models", headers=admin, json={"source_uri": str(master)})
    assert r.status_code == 201, r.text
    assert r.json()["placement_alarms"] == {"raised": 0, "cleared": 1, "open": 1}
    assert open_alarms() == {(f"placement_unknown:m-bad-{u}", None, f"m-bad-{u}")}
