"""The forecast endpoints on both backends (SQLite, real PostgreSQL), with real tokens:
retrain, issue, latest, runs, models; 401/403/404/422 as problem+json."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from derms.api.app import create_app
from derms.config import get_settings
from derms.store.db import make_engine
from tests.integration.conftest import mint_token
from tests.integration.test_forecast_store import END, add_meters, write_history

PROBLEM = "application/problem+json"


_mint = mint_token


@pytest.fixture(scope="module")
def api(db_url, tmp_path_factory):
    settings = get_settings(database_url=db_url, data_dir=tmp_path_factory.mktemp("data"))
    app = create_app(settings)
    client = TestClient(app, raise_server_exceptions=False)
    client.reader, client.operator = _mint(db_url, "read"), _mint(db_url, "operate")
    uid = uuid.uuid4().hex[:6]
    client.meters = [f"am1-{uid}", f"am2-{uid}"]
    client.short = f"ashort-{uid}"
    engine = make_engine(db_url)
    add_meters(engine, [*client.meters, client.short])
    write_history(engine, client.meters)
    write_history(engine, [client.short], n_hours=72, start=END - timedelta(days=3))
    engine.dispose()
    with client:
        yield client


def _retrain(api, name, targets=None, **extra):
    body = {"name": name, "targets": targets or [f"{m}:p_kw:load" for m in api.meters],
            "kind": "load", "step_s": 3600, "n_rounds": 20, "train_end": END.isoformat(), **extra}
    return api.post("/v1/forecasts/retrain", headers=api.operator, json=body)


def test_retrain_issue_latest_runs_models(api):
    name = f"api-{uuid.uuid4().hex[:6]}"
    r = _retrain(api, name)
    assert r.status_code == 200, r.text
    model = r.json()["model"]
    assert r.json()["created"] and model["version"] and model["n_series"] == 2
    assert _retrain(api, name).json()["created"] is False  # same data, same version
    ids = []
    for hours in (0, 6):
        origin = (END + timedelta(hours=hours)).isoformat()
        r = api.post("/v1/forecasts/issue", headers=api.operator,
                     json={"name": name, "origin": origin})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model_id"] == model["id"] and len(out["runs"]) == 2 and not out["failed"]
        ids.append(out["runs"][0]["run_id"])
    q = {"series": api.meters[0], "quantity": "p_kw"}
    r = api.get("/v1/forecasts/latest", headers=api.reader, params=q)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run"]["id"] == ids[1] and body["rows"] == 24
    assert body["run"]["issued_at"] == "2026-02-10T06:00:00+00:00"
    assert body["t"][0] == "2026-02-10T06:00:00+00:00" and body["t"][-1].endswith("+00:00")
    assert all(a <= b <= c for a, b, c in zip(body["p10"], body["p50"], body["p90"]))
    r = api.get("/v1/forecasts/latest", headers=api.reader,
                params={**q, "at": (END + timedelta(hours=1)).isoformat()})
    assert r.json()["run"]["id"] == ids[0]
    # issue 11: the same run as a CSV / Parquet download
    import io

    import pandas as pd
    r = api.get("/v1/forecasts/latest", headers=api.reader, params={**q, "download": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert f"forecast_run_{ids[1]}.csv" in r.headers["content-disposition"]
    csv = pd.read_csv(io.StringIO(r.text))
    assert list(csv.columns) == ["t", "p10", "p50", "p90"] and len(csv) == 24
    assert csv["t"].iloc[0] == "2026-02-10T06:00:00Z"
    assert csv["p50"].tolist() == pytest.approx(body["p50"], rel=1e-12)
    r = api.get("/v1/forecasts/latest", headers=api.reader, params={**q, "download": "parquet"})
    pq = pd.read_parquet(io.BytesIO(r.content))
    assert len(pq) == 24 and str(pq["t"].dt.tz) == "UTC"
    r = api.get("/v1/forecasts/latest", headers=api.reader, params={**q, "download": "xlsx"})
    assert r.status_code == 422
    r = api.get("/v1/forecasts/runs", headers=api.reader,
                params={**q, "since": END.isoformat(), "limit": 1, "values": "true"})
    page = r.json()
    assert page["total"] == 2 and len(page["items"]) == 1 and page["items"][0]["id"] == ids[1]
    assert len(page["items"][0]["p50"]) == 24
    r = api.get("/v1/forecasts/runs", headers=api.reader,
                params={**q, "since": END.isoformat(), "limit": 1, "offset": 1})
    assert r.json()["items"][0]["id"] == ids[0]
    r = api.get("/v1/forecasts/models", headers=api.reader, params={"name": name})
    assert r.json()["total"] == 1 and r.json()["items"][0]["version"] == model["version"]


def test_auth_401_403(api):
    assert api.get("/v1/forecasts/models").status_code == 401
    r = api.get("/v1/forecasts/models", headers={"Authorization": "Bearer derms_x_y"})
    assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
    r = api.post("/v1/forecasts/retrain", headers=api.reader,
                 json={"name": "x", "targets": ["a:p_kw:load"]})
    assert r.status_code == 403 and r.headers["content-type"] == PROBLEM
    assert api.post("/v1/forecasts/issue", headers=api.reader,
                    json={"name": "x"}).status_code == 403


def test_404_unknown_series_or_model(api):
    r = api.get("/v1/forecasts/latest", headers=api.reader,
                params={"series": "nosuch", "quantity": "p_kw"})
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert "nosuch" in r.json()["detail"]
    r = api.get("/v1/forecasts/runs", headers=api.reader,
                params={"series": "nosuch", "quantity": "p_kw"})
    assert r.status_code == 404
    r = _retrain(api, "n404", targets=["nosuch:p_kw:load"])
    assert r.status_code == 404 and "nosuch" in r.json()["detail"]
    r = api.post("/v1/forecasts/issue", headers=api.operator, json={"name": "never-trained"})
    assert r.status_code == 404 and "never-trained" in r.json()["detail"]
    # a known series without any forecast yet
    r = api.get("/v1/forecasts/latest", headers=api.reader,
                params={"series": api.short, "quantity": "p_kw"})
    assert r.status_code == 404 and "no forecast" in r.json()["detail"]


def _fields(r) -> set[str]:
    return {e["field"] for e in r.json().get("errors", [])}


def test_422_names_the_field(api):
    r = _retrain(api, "short", targets=[f"{api.short}:p_kw:load"])
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert api.short in r.json()["detail"] and "body.targets" in _fields(r)
    r = _retrain(api, "bad", kind="wind")
    assert r.status_code == 422 and "body.kind" in _fields(r)
    r = _retrain(api, "bad", step_s=7000)                            # does not divide a day
    assert r.status_code == 422 and "body.step_s" in _fields(r)
    r = _retrain(api, "bad", horizon_s=5400)                         # not a multiple of 1 h
    assert r.status_code == 422 and "body.horizon_s" in _fields(r)
    r = _retrain(api, "bad", tz="Mars/Olympus")
    assert r.status_code == 422 and "body.tz" in _fields(r)
    r = _retrain(api, "bad", targets=["only-two:parts"])
    assert r.status_code == 422 and "body.targets.0" in _fields(r)
    r = _retrain(api, "bad", train_end="2026-02-10T00:00:00")
    assert r.status_code == 422 and "body.train_end" in _fields(r)
    r = api.post("/v1/forecasts/issue", headers=api.operator, json={"name": "x", "extra": 1})
    assert r.status_code == 422 and "body.extra" in _fields(r)
    r = api.get("/v1/forecasts/runs", headers=api.reader,
                params={"series": api.meters[0], "quantity": "p_kw",
                        "since": "2026-02-10T00:00:00"})
    assert r.status_code == 422 and "query.since" in _fields(r)
