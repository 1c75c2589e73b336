"""``POST /v1/dispatch/plan`` on the real app with real tokens and real OpenDSS (IEEE 13):
summary + paginated schedule; 401/403; infeasible → 422 problem+json naming what binds;
bad bodies → 422."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from derms.api.app import create_app
from derms.config import get_settings
from tests.integration.test_forecast_api import _mint

PROBLEM = "application/problem+json"
BODY = {"feeder": "ieee13", "pv_penetration": 0.3, "battery_penetration": 0.3,
        "ev_penetration": 0.2, "seed": 1, "horizon": "24h", "step": "1h",
        "policy": "cost_minimal", "forecast": "perfect"}


@pytest.fixture(scope="module")
def api(db_url, tmp_path_factory):
    settings = get_settings(database_url=db_url, data_dir=tmp_path_factory.mktemp("data"))
    app = create_app(settings)
    client = TestClient(app, raise_server_exceptions=False)
    client.reader, client.operator = _mint(db_url, "read"), _mint(db_url, "operate")
    with client:
        yield client


def test_plan_returns_summary_and_schedule_page(api):
    r = api.post("/v1/dispatch/plan", headers=api.operator,
                 json={**BODY, "schedule_offset": 5, "schedule_limit": 20})
    assert r.status_code == 200, r.text
    out = r.json()
    s = out["summary"]
    for key in ("peak_uncontrolled_kw", "peak_rule_based_kw", "peak_optimised_kw",
                "peak_perfect_foresight_kw", "violations_uncontrolled",
                "violations_optimised", "solve_s", "ac_verify_s", "n_controllable_ders"):
        assert key in s, key
    assert s["master"] == "ieee13" and s["n_steps"] == 24
    assert s["violations_optimised"] == 0
    assert s["peak_optimised_kw"] <= s["peak_uncontrolled_kw"] + 1e-6
    n = s["n_controllable_ders"]
    assert len(out["ders"]) == n and {"der_id", "kind", "bus"} <= set(out["ders"][0])
    assert out["ev_shortfalls"] == [] and out["summary"]["n_ev_short"] == 0
    sch = out["schedule"]
    assert sch["total"] == 24 * n and sch["offset"] == 5 and sch["rows"] == 20
    assert len(sch["der_id"]) == len(sch["p_kw"]) == len(sch["timestamp"]) == 20
    assert sch["timestamp"][0].endswith("Z")
    # non-battery rows have no SOC: JSON null, not NaN
    assert any(v is None for v in sch["soc_frac"])
    # issue 11: the whole optimised schedule as a CSV download
    import io

    import pandas as pd
    r = api.post("/v1/dispatch/plan", headers=api.operator, params={"download": "csv"},
                 json={**BODY, "schedule_limit": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    csv = pd.read_csv(io.StringIO(r.text))
    assert len(csv) == 24 * n and {"der_id", "timestamp", "p_kw"} <= set(csv.columns)
    assert csv["timestamp"].str.endswith("Z").all()


def test_grouped_plan_schedules_every_der(api):
    r = api.post("/v1/dispatch/plan", headers=api.operator,
                 json={**BODY, "pv_penetration": 1.0, "battery_penetration": 1.0,
                       "group_size": 4})
    assert r.status_code == 200, r.text
    s = r.json()["summary"]
    assert s["n_planned_ders"] < s["n_controllable_ders"]
    assert s["violations_optimised"] == 0
    assert r.json()["schedule"]["total"] == 24 * s["n_controllable_ders"]
    assert s["group_size"] == 4 and s["group_size_from"] == "given"
    auto = api.post("/v1/dispatch/plan", headers=api.operator,
                    json={**BODY, "group_size": "auto"}).json()["summary"]
    assert auto["group_size"] == 1 and auto["group_size_from"] == "auto"


def test_rolling_plan_reports_its_realtime_correction_or_its_absence(api):
    """``realtime`` reaches the rolling run: a block of what the real-time correction
    moved when on, null when the re-plans were executed as planned."""
    body = {**BODY, "horizon": "6h", "forecast": "noisy"}
    on = api.post("/v1/dispatch/plan", headers=api.operator, json=body)
    off = api.post("/v1/dispatch/plan", headers=api.operator, json={**body, "realtime": False})
    assert on.status_code == 200 and off.status_code == 200, (on.text, off.text)
    rt = on.json()["summary"]["rolling"]["realtime_correction"]
    assert set(rt) == {"intervals_corrected", "rows_beyond_before", "rows_beyond_after",
                       "kw_moved", "kvar_moved", "s"}
    assert off.json()["summary"]["rolling"]["realtime_correction"] is None
    bad = api.post("/v1/dispatch/plan", headers=api.operator, json={**body, "realtime": "x"})
    assert bad.status_code == 422


def test_auth(api):
    assert api.post("/v1/dispatch/plan", json=BODY).status_code == 401
    r = api.post("/v1/dispatch/plan", headers=api.reader, json=BODY)
    assert r.status_code == 403 and r.headers["content-type"] == PROBLEM


def test_infeasible_is_422_with_the_explanation(api):
    # a negative export limit asks for a minimum import far beyond what the DERs can draw
    r = api.post("/v1/dispatch/plan", headers=api.operator,
                 json={**BODY, "export_limit_kw": -20000.0})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["type"].endswith("/infeasible")
    assert "export_limit feeder_head" in body["detail"] and "short by" in body["detail"]


@pytest.mark.parametrize("change", [
    {"feeder": "nosuch"}, {"pv_penetration": 1.5}, {"horizon": "25min"},
    {"step": "fortnight"}, {"policy": "random"}, {"unknown_field": 1}, {"horizon": "30d"},
    {"replan_every": "often"}, {"replan_every": "5min"}, {"group_size": 0},
    {"group_size": "some"}, {"group_size": 1001}, {"export_limit_kw": -1e20},
    {"pv_penetration": "0.3"}, {"pv_penetration": True}, {"realtime": "yes"}, {"seed": "1"},
])
def test_bad_body_is_422(api, change):
    r = api.post("/v1/dispatch/plan", headers=api.operator, json={**BODY, **change})
    assert r.status_code == 422, (change, r.text)
    assert r.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(("change", "field"), [
    ({"horizon": "25min"}, "horizon"), ({"step": "fortnight"}, "step"),
    ({"horizon": "30d"}, "horizon"), ({"step": "0min"}, "step"),
    ({"replan_every": "often"}, "replan_every"), ({"replan_every": "5min"}, "replan_every"),
])
def test_bad_duration_names_the_body_field_not_a_cli_option(api, change, field):
    r = api.post("/v1/dispatch/plan", headers=api.operator, json={**BODY, **change})
    assert r.status_code == 422, (change, r.text)
    body = r.json()
    assert body["errors"][0]["field"] == f"body.{field}"
    assert "--" not in body["detail"] and field in body["detail"]
