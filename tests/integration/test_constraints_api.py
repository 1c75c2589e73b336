"""POST /v1/constraints/forecast on IEEE 13: answers hourly probabilities; bad input is 4xx."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from derms.api.app import create_app
from derms.config import get_settings
from derms.store.migrate import upgrade
from tests.integration.conftest import mint_token

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    url = f"sqlite:///{data / 'derms.db'}"
    upgrade(url)
    headers = mint_token(url, "read")
    client = TestClient(create_app(get_settings(database_url=url, data_dir=data)),
                        raise_server_exceptions=False)
    client.headers_ok = headers
    with client:
        yield client


def _histories(days=30):
    idx = pd.date_range("2024-06-01", periods=days * 24, freq="h", tz="UTC")
    hour = idx.hour.to_numpy()
    rng = np.random.default_rng(0)
    load = 0.6 + 0.3 * np.sin((hour - 12) / 24 * 2 * np.pi) + rng.normal(0, 0.02, len(idx))
    pv = np.clip(np.sin((hour - 12) / 12 * np.pi + np.pi / 2), 0, None) * rng.uniform(
        0.5, 1.0, len(idx))
    ts = [t.isoformat() for t in idx]
    return ({"timestamps": ts, "values": load.round(4).tolist()},
            {"timestamps": ts, "values": pv.round(4).tolist()}, idx[-1] + pd.Timedelta("1h"))


def test_constraint_forecast_answers_hourly_probabilities(api):
    load, pv, origin = _histories()
    body = {"feeder": "ieee13", "load_history": load, "pv_history": pv,
            "origin": origin.isoformat(), "horizon_h": 6, "pv_penetration": 0.5,
            "pv_capacity": 1.0}
    r = api.post("/v1/constraints/forecast", headers=api.headers_ok, json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["feeder"] and doc["n_pv"] > 0 and doc["n_scenarios"] >= 3
    assert {"overvoltage", "undervoltage", "thermal"} == set(doc["predicted_hours"])
    assert doc["hourly"] and all(0 <= row["probability"] <= 1 for row in doc["hourly"])
    # what the forecast load breaks by itself (PV at zero), listed apart
    assert isinstance(doc["pre_existing"], list) and doc["pre_existing_truncated"] in (
        True, False)
    assert all(row["pre_existing"] and 0 < row["probability"] <= 1
               for row in doc["pre_existing"])


@pytest.mark.parametrize(("mutate", "status"), [
    (lambda b: b.update(feeder="ieee9999"), 422),
    (lambda b: b.update(origin="2024-07-01T00:00:00"), 422),
    (lambda b: b["load_history"].update(values=[1.0]), 422),
    (lambda b: b.update(horizon_h=-1), 422),
    (lambda b: b.update(load_history={"timestamps": b["load_history"]["timestamps"][:48],
                                      "values": b["load_history"]["values"][:48]}), 422),
])
def test_bad_requests_are_problems(api, mutate, status):
    load, pv, origin = _histories()
    body = {"feeder": "ieee13", "load_history": load, "pv_history": pv,
            "origin": origin.isoformat(), "horizon_h": 6}
    mutate(body)
    r = api.post("/v1/constraints/forecast", headers=api.headers_ok, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)


def test_an_all_zero_pv_history_asks_for_the_capacity(api):
    """It said "pv capacity must be positive, got 0" though no capacity was given."""
    load, pv, origin = _histories()
    pv["values"] = [0.0] * len(pv["values"])
    r = api.post("/v1/constraints/forecast", headers=api.headers_ok, json={
        "feeder": "ieee13", "load_history": load, "pv_history": pv,
        "origin": origin.isoformat(), "horizon_h": 6})
    assert r.status_code == 422 and "give the PV capacity" in r.json()["detail"], r.text


def test_token_required(api):
    r = api.post("/v1/constraints/forecast", json={})
    assert r.status_code == 401
