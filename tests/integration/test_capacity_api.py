"""``/v1/hosting-capacity``, ``/v1/envelopes``, ``/v1/interconnect`` on the real app with
real tokens and real OpenDSS (IEEE 13): results, scopes, bad bodies as problem+json."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from derms.api.app import create_app
from derms.config import get_settings
from tests.integration.test_forecast_api import _mint

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def api(db_url, tmp_path_factory):
    settings = get_settings(database_url=db_url, data_dir=tmp_path_factory.mktemp("data"))
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    client.reader, client.operator = _mint(db_url, "read"), _mint(db_url, "operate")
    with client:
        yield client


def test_hosting_capacity(api):
    r = api.post("/v1/hosting-capacity", headers=api.reader,
                 json={"feeder": "ieee13", "kind": "pv", "buses": ["675", "611.3"]})
    assert r.status_code == 200, r.text
    sites = r.json()["sites"]
    assert sites["bus"] == ["675", "611"] and sites["phases"] == ["1.2.3", "3"]
    assert all(v >= 0 for v in sites["hc_kw"])


def test_envelopes_table_and_site_controls(api):
    body = {"feeder": "ieee13", "hours": 1, "step_min": 15, "policy": "proportional"}
    r = api.post("/v1/envelopes", headers=api.operator, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    n_cp = out["summary"]["connection_points"]
    tab = out["table"]
    assert tab["total"] == 4 * n_cp and tab["timestamp"][0].endswith("Z")
    assert all(v >= 0 for v in tab["export_limit_kw"])
    assert out["summary"]["export"]["ac_max_v_excess_pu"] <= 0.0005
    r = api.post("/v1/envelopes", headers=api.operator,
                 json={**body, "format": "site_controls", "limit": 3})
    ctl = r.json()["site_controls"]
    assert ctl["rows"] == 3 and ctl["duration_s"] == [900] * 3
    assert len(ctl["mrid"][0]) == 32 and len(set(ctl["mrid"])) == 3
    assert ctl["export_limit_w"][0] == round(tab["export_limit_kw"][0] * 1000)
    # issue 11: the whole envelope set as CSV / Parquet
    import io

    import pandas as pd
    r = api.post("/v1/envelopes", headers=api.operator, params={"download": "csv"},
                 json={**body, "limit": 2})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    env = pd.read_csv(io.StringIO(r.text), dtype={"connection_point": str, "bus": str,
                                                 "phase": str})
    assert list(env.columns) == ["connection_point", "bus", "phase", "timestamp",
                                 "export_limit_kw", "import_limit_kw"]
    assert len(env) == 4 * n_cp and env["timestamp"].str.endswith("Z").all()
    r = api.post("/v1/envelopes", headers=api.operator, params={"download": "parquet"},
                 json={**body, "format": "site_controls"})
    ctl = pd.read_parquet(io.BytesIO(r.content))
    assert len(ctl) == 4 * n_cp and "export_limit_w" in ctl


def test_envelope_sets_are_stored_and_read_back(api):
    import io

    import pandas as pd
    body = {"feeder": "ieee13", "hours": 1, "step_min": 30, "store": True, "limit": 0}
    r = api.post("/v1/envelopes", headers=api.operator, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    sid, n_cp = out["set_id"], out["summary"]["connection_points"]
    assert "_table" not in out and out["table"]["rows"] == 0
    r = api.get("/v1/envelopes/sets", headers=api.reader, params={"feeder": "ieee13"})
    items = r.json()["items"]
    assert r.status_code == 200 and items[0]["id"] == sid
    assert items[0]["n_intervals"] == 2 and items[0]["n_connection_points"] == n_cp
    assert items[0]["step_s"] == 1800 and items[0]["policy"] == "equal"
    r = api.get(f"/v1/envelopes/sets/{sid}", headers=api.reader, params={"limit": 3})
    got = r.json()
    assert got["summary"]["connection_points"] == n_cp and got["values"]["total"] == 2 * n_cp
    assert got["values"]["rows"] == 3 and got["values"]["timestamp"][0].endswith("Z")
    r = api.get(f"/v1/envelopes/sets/{sid}", headers=api.reader, params={"download": "csv"})
    csv = pd.read_csv(io.StringIO(r.text), dtype={"connection_point": str})
    fresh = api.post("/v1/envelopes", headers=api.operator,
                     json={**body, "store": False, "limit": 10_000}).json()["table"]
    want = pd.DataFrame({k: fresh[k] for k in ("connection_point", "timestamp",
                                               "export_limit_kw", "import_limit_kw")})
    merged = csv.merge(want, on=["connection_point", "timestamp"], suffixes=("", "_w"))
    assert len(merged) == 2 * n_cp  # a second computation gives the same envelopes
    assert (merged["export_limit_kw"] - merged["export_limit_kw_w"]).abs().max() < 1e-6
    assert api.get("/v1/envelopes/sets/999999", headers=api.reader).status_code == 404
    # past the database's 64-bit ids: a 422 at validation (was the driver's OverflowError)
    r = api.get(f"/v1/envelopes/sets/{10**23}", headers=api.reader)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert api.get("/v1/envelopes/sets", params={}).status_code == 401


def test_interconnect(api):
    r = api.post("/v1/interconnect", headers=api.reader,
                 json={"feeder": "ieee13", "bus": "675", "kind": "pv", "kw": 50, "days": 2,
                       "start": "2026-06-01T08:00:00Z"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["static_ok"] is True and out["flexible"]["export"]["curtailed_kwh"] == 0


def test_scopes_and_bad_bodies(api):
    body = {"feeder": "ieee13", "hours": 1, "step_min": 15}
    assert api.post("/v1/envelopes", json=body).status_code == 401
    r = api.post("/v1/envelopes", headers=api.reader, json=body)
    assert r.status_code == 403 and r.headers["content-type"].startswith(PROBLEM)
    r = api.post("/v1/interconnect", headers=api.reader,
                 json={"feeder": "ieee13", "bus": "nosuch", "kw": 10, "days": 1})
    assert r.status_code == 422 and "unknown bus 'nosuch'" in r.json()["detail"]
    r = api.post("/v1/interconnect", headers=api.reader,
                 json={"feeder": "ieee13", "bus": "675", "kw": -10, "days": 1})
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM)
    # a size that overflows: 200 with nulls for Infinity / NaN before
    r = api.post("/v1/interconnect", headers=api.reader,
                 json={"feeder": "ieee13", "bus": "675", "kw": 1e308, "days": 1})
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM)
    r = api.post("/v1/hosting-capacity", headers=api.reader,
                 json={"feeder": "ieee13", "buses": ["675"], "max_kw": 1e308})
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM)
    r = api.post("/v1/envelopes", headers=api.operator,
                 json={**body, "connection_points": ["nosuch"]})
    assert r.status_code == 422 and "no enabled load" in r.json()["detail"]
    r = api.post("/v1/envelopes", headers=api.operator,  # said "no enabled loads"
                 json={**body, "connection_points": []})
    assert r.status_code == 422 and "connection-point list is empty" in r.json()["detail"]
    r = api.post("/v1/hosting-capacity", headers=api.reader,
                 json={"feeder": "ieee13", "buses": ["611.1"]})
    assert r.status_code == 422 and "has no phase 1" in r.json()["detail"]
    for method in ("fast-groups", "brute-force", "linear"):  # was 500 / an empty 200
        r = api.post("/v1/hosting-capacity", headers=api.reader,
                     json={"feeder": "ieee13", "buses": [], "method": method})
        assert r.status_code == 422 and "bus list is empty" in r.json()["detail"], method
    for route, extra in (("/v1/interconnect", {"bus": "675", "kw": 5, "days": 1}),
                         ("/v1/envelopes", {"hours": 1})):
        for start in ("0001-01-01T00:00:00Z", "9999-12-31T12:00:00Z"):  # were 500s
            r = api.post(route, headers=api.operator,
                         json={"feeder": "ieee13", "start": start, **extra})
            assert r.status_code == 422 and "year from 1900" in r.text, (route, r.text)
