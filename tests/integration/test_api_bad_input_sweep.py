"""Regression tests for the independent bad-input sweep of the REST API (17 defects, D1..D17;
report, repro scripts and patches in the sweep's folder, ``repro/d01_*.py`` ..
``repro/d17_*.py``). Each test names the defect it covers; before the fixes every one of
them failed (a 500, a 201 for a value devices then choked on, or a misleading answer).

Both backends (SQLite, real PostgreSQL), in process through FastAPI's TestClient; the IEEE
2030.5 management routes work on a :class:`PersistentRepository` over the same database,
as ``derms serve --ieee2030-5-port`` wires them.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from derms.api.app import create_app
from derms.config import get_settings
from derms.protocols.ieee2030_5.sql_repository import PersistentRepository
from tests.integration.conftest import mint_token

SEP = "/v1/ieee2030-5"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def api(db_url):
    app = create_app(get_settings(database_url=db_url, max_body_bytes=200_000))
    app.state.ieee2030_5_repo = PersistentRepository(app.state.engine)
    client = TestClient(app, raise_server_exceptions=False)
    client.admin, client.reader = mint_token(db_url, "admin"), mint_token(db_url, "read")
    client.operator = mint_token(db_url, "operate")
    client.backend = db_url.split(":", 1)[0]
    return client


def _u() -> str:
    return uuid.uuid4().hex[:8]


def _hex32() -> str:
    return uuid.uuid4().hex.upper()


def _problem(r, status: int = 422) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return r.json()


@pytest.fixture(scope="module")
def program(api):
    """A DERProgram and an end device in it through a function set assignment (ids)."""
    r = api.post(f"{SEP}/programs", headers=api.admin, json={"description": "sweep",
                                                                 "primacy": 5})
    assert r.status_code == 201, r.text
    pid = r.json()["program_id"]
    lfdi = uuid.uuid4().hex[:20].upper() * 2
    r = api.post(f"{SEP}/end-devices", headers=api.admin,
                 json={"lfdi": lfdi, "connection_point": "NMI-SWEEP"})
    assert r.status_code == 201, r.text
    edev = r.json()["end_device_id"]
    r = api.post(f"{SEP}/function-set-assignments", headers=api.admin,
                 json={"description": "sweep", "program_ids": [pid]})
    assert r.status_code == 201, r.text
    r = api.post(f"{SEP}/function-set-assignments/{r.json()['fsa_id']}/end-devices",
                 headers=api.admin, json={"end_device_ids": [edev]})
    assert r.status_code == 200, r.text
    return {"program_id": pid, "edev": edev}


def _soon(hours: float = 1) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).replace(microsecond=0).isoformat()


def _control(api, program, **kw):
    body = {"start": _soon(), "duration_s": 60, "export_limit_w": 1000.0,
            "end_device_id": program["edev"], **kw}
    return api.post(f"{SEP}/programs/{program['program_id']}/controls", headers=api.operator,
                    json=body)


def _envelope_row(**kw) -> dict:
    return {"mrid": _hex32(), "connection_point": "NMI-SWEEP", "start": _soon(),
            "duration_s": 300, "export_limit_w": 10.0, "import_limit_w": None, **kw}


def _envelopes(api, program, *rows, content: str | None = None):
    url = f"{SEP}/programs/{program['program_id']}/envelopes"
    if content is not None:
        return api.post(url, headers={**api.operator, **JSON}, content=content)
    return api.post(url, headers=api.operator, json={"site_controls": list(rows)})


def _dispatch(api, program, der_id="bat1", timestamp=None, p_kw=1.0, content=None):
    url = f"{SEP}/programs/{program['program_id']}/dispatch"
    if content is not None:
        return api.post(url, headers={**api.operator, **JSON}, content=content)
    return api.post(url, headers=api.operator, json={
        "schedule": {"der_id": [der_id], "timestamp": [timestamp or _soon()], "p_kw": [p_kw]},
        "step_s": 900})


def _reading(**kw) -> dict:
    return {"series": "sweep-m1", "quantity": "p", "unit": "kW", "t": "2026-05-01T00:00:00Z",
            "value": 1.0, **kw}


# ----------------------------------------------------------------------------- D1


@pytest.mark.parametrize("uri", ["/" + "a" * 300, "~nosuchuser/Master.dss"])
def test_d01_unusable_model_source_uri_is_422(api, uri):
    """D1: resolve_master let OSError (name too long) / RuntimeError (unknown ~user) out."""
    f = f"d01-{_u()}"
    assert api.post("/v1/feeders", headers=api.admin, json={"feeder_id": f}).status_code == 201
    p = _problem(api.post(f"/v1/feeders/{f}/models", headers=api.admin,
                          json={"source_uri": uri}))
    assert "not usable" in p["detail"] or "not usable" in str(p.get("errors"))


# ----------------------------------------------------------------------------- D2


def test_d02_decisions_t_out_of_range_in_utc_is_422(api):
    r = api.get("/v1/control/decisions/bat-sweep", headers=api.reader,
                params={"t": "0001-01-01T00:00:00+05:00"})
    assert "out of range" in _problem(r)["detail"] or r.json().get("errors")


@pytest.mark.parametrize("start", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+05:00"])
def test_d02_control_start_out_of_range_in_utc_is_422(api, program, start):
    p = _problem(_control(api, program, start=start))
    assert any("out of range" in e["detail"] for e in p["errors"]), p


def test_d02_envelope_row_start_out_of_range_in_utc_is_422(api, program):
    p = _problem(_envelopes(api, program, _envelope_row(start="0001-01-01T00:00:00+05:00")))
    assert any(e["field"] == "start" for e in p["errors"]), p


@pytest.mark.parametrize("t", ["9999-12-31T23:45:00Z", "0001-01-01T00:00:00+05:00"])
def test_d02_dispatch_timestamp_out_of_range_is_422(api, program, t):
    p = _problem(_dispatch(api, program, timestamp=t))
    assert [e["field"] for e in p["errors"]] == ["timestamp"] and p["errors"][0]["row"] == 0


def test_d02_adms_switching_t_out_of_range_in_utc_is_422(api):
    f = f"d02-{_u()}"
    assert api.post("/v1/feeders", headers=api.admin, json={"feeder_id": f}).status_code == 201
    r = api.post("/v1/adms/messages", headers=api.operator, json={
        "type": "switching", "feeder_id": f, "t": "0001-01-01T00:00:00+05:00",
        "switches": [{"switch": "671692", "state": "open"}]})
    _problem(r)


# ----------------------------------------------------------------------------- D3


def test_d03_a_control_near_year_9999_does_not_break_delivery(api, program):
    """D3: _due computed start + grace (60 s): a control starting 9999-12-31T23:59:00Z made
    every GET /delivery a 500 from then on."""
    r = _control(api, program, start="9999-12-31T23:59:00Z", duration_s=30)
    assert r.status_code == 201, r.text
    assert api.get(f"{SEP}/delivery", headers=api.reader).status_code == 200
    r = api.get(f"{SEP}/end-devices/{program['edev']}/delivery", headers=api.reader)
    assert r.status_code == 200, r.text
    # start + duration beyond year 9999 is refused up front
    _problem(_control(api, program, start="9999-12-31T23:59:00Z", duration_s=120))


# ----------------------------------------------------------------------------- D4


def test_d04_power_beyond_activepower_range_is_422(api, program):
    """D4: > 32767e9 W was stored, then the device's DefaultDERControl/DERControlList 500."""
    pid = program["program_id"]
    _problem(api.put(f"{SEP}/programs/{pid}/default-control", headers=api.admin,
                     json={"export_limit_w": 1e15}))
    _problem(_control(api, program, export_limit_w=1e15))
    p = _problem(_envelopes(api, program, _envelope_row(export_limit_w=1e15)))
    assert [e["field"] for e in p["errors"]] == ["export_limit_w"]
    p = _problem(_dispatch(api, program, p_kw=-9.3e18))
    assert [e["field"] for e in p["errors"]] == ["p_kw"]
    # the largest ActivePower still fits
    r = api.put(f"{SEP}/programs/{pid}/default-control", headers=api.admin,
                json={"export_limit_w": 32767e9})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- D5


def test_d05_xml_illegal_control_characters_are_422(api, program):
    """D5: lxml refused to serialise them: every device GET of the resource was a 500."""
    _problem(api.post(f"{SEP}/programs", headers=api.admin,
                      json={"description": "bad\u0007desc", "primacy": 3}))
    _problem(api.post(f"{SEP}/function-set-assignments", headers=api.admin,
                      json={"description": "bad\u001bfsa"}))
    _problem(_control(api, program, description="x\u0001"))
    _problem(api.put(f"{SEP}/programs/{program['program_id']}/default-control",
                     headers=api.admin, json={"export_limit_w": 5.0, "description": "\u000b"}))
    _problem(api.post(f"{SEP}/end-devices", headers=api.admin,
                      json={"lfdi": "E5" * 20, "connection_point": "NMI\u0002"}))
    p = _problem(_envelopes(api, program, _envelope_row(connection_point="NMI\u0007")))
    assert [e["field"] for e in p["errors"]] == ["connection_point"]
    # tab, LF and CR are XML text
    r = api.post(f"{SEP}/programs", headers=api.admin, json={"description": "a\tb",
                                                             "primacy": 3})
    assert r.status_code == 201, r.text


# ----------------------------------------------------------------------------- D6


def test_d06_lone_surrogate_escapes_are_422(api, program):
    """D6: stored, then echoed back: PydanticSerializationError, a 500 after the write."""
    lone = '"\\ud800"'  # JSON text of a lone surrogate escape
    body = json.dumps({"schedule": {"der_id": ["X"], "timestamp": [_soon()], "p_kw": [1.0]},
                       "step_s": 900}).replace('"X"', lone)
    p = _problem(_dispatch(api, program, content=body))
    assert "surrogate" in str(p)
    body = json.dumps({"site_controls": [_envelope_row(connection_point="X")]}).replace(
        '"X"', lone)
    p = _problem(_envelopes(api, program, content=body))
    assert "surrogate" in str(p)


# ----------------------------------------------------------------------------- D7


def test_d07_overlong_retrain_tz_is_422(api):
    """D7: ZoneInfo("A" * 300) raised OSError (file name too long): a 500."""
    r = api.post("/v1/forecasts/retrain", headers=api.operator,
                 json={"name": "m", "targets": ["m1:p_kw:load"], "tz": "A" * 300})
    p = _problem(r)
    assert any(e["field"].endswith("tz") for e in p["errors"]), p


# ----------------------------------------------------------------------------- D8


def test_d08_envelope_sets_offset_is_bounded(api):
    """D8: offset 2**63 overflowed SQLite's integer: a 500 (other lists bound it)."""
    for path in ("/v1/envelopes/sets", "/v1/envelopes/sets/1"):
        p = _problem(api.get(path, headers=api.reader, params={"offset": str(2**63)}))
        assert any(e["field"].endswith("offset") for e in p["errors"]), p


# ----------------------------------------------------------------------------- D9


@pytest.mark.parametrize("auth", ["Bearer derms_aaaaaaaaaaaa_bbbb", "Basic Zm9vOmJhcg==",
                                  "Bearer nonsense"])
def test_d09_a_wrong_token_with_a_malformed_body_is_401(api, auth):
    """D9: FastAPI parsed the body before the auth dependency: '{' got 422, not 401."""
    r = api.post("/v1/devices", headers={"Authorization": auth, **JSON}, content=b"{")
    assert _problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")


# ----------------------------------------------------------------------------- D10


@pytest.mark.parametrize("bus", [" ", ""])
def test_d10_a_blank_bus_is_stored_as_null(api, bus):
    """D10: _opendss_name stripped " " to "" and stored it (never checked against a model)."""
    der = f"d10-{_u()}"
    r = api.post("/v1/devices", headers=api.admin, json={
        "der_id": der, "site_id": f"s-{der}", "der_type": "pv", "s_max_kva": 5, "bus": bus})
    assert r.status_code in (201, 422), r.text
    if r.status_code == 201:
        assert api.get(f"/v1/devices/{der}", headers=api.reader).json()["bus"] is None


# ----------------------------------------------------------------------------- D11


@pytest.mark.parametrize("start", ["0.3", 0, 1767225600, "1767225600"])
def test_d11_numbers_are_no_datetimes(api, program, start):
    """D11: pydantic took a JSON number (or numeric text) as Unix time."""
    p = _problem(_control(api, program, start=start))
    assert any("start" in e["field"] + e["detail"] for e in p["errors"]), p


def test_d11_model_valid_from_as_a_number_is_422(api):
    f = f"d11-{_u()}"
    assert api.post("/v1/feeders", headers=api.admin, json={"feeder_id": f}).status_code == 201
    _problem(api.post(f"/v1/feeders/{f}/models", headers=api.admin,
                      json={"source_uri": "ieee13", "valid_from": -1}))


# ----------------------------------------------------------------------------- D12


@pytest.fixture(scope="module")
def meter(api):
    r = api.post("/v1/meters", headers=api.admin, json={"meter_id": "sweep-m1"})
    assert r.status_code in (201, 409), r.text
    return "sweep-m1"


def test_d12_a_reading_value_given_as_text_is_422(api, meter):
    """D12: "value": "0.3" was stored as 0.3 (README: a number field takes a JSON number)."""
    r = api.post("/v1/readings", headers=api.operator,
                 json={"readings": [_reading(t="2026-05-01T00:00:01Z", value="0.3")]})
    p = _problem(r)
    assert p["errors"][0]["row"] == 0 and p["errors"][0]["field"] == "value", p
    q = {"series": meter, "quantity": "p_kw", "start": "2026-05-01T00:00:00Z",
         "end": "2026-05-01T00:01:00Z"}
    assert api.get("/v1/readings", headers=api.reader, params=q).json()["rows"] == 0


# ----------------------------------------------------------------------------- D13


def test_d13_every_non_object_row_is_listed(api, meter):
    """D13: only the first non-object row was named; the others stayed hidden."""
    ok = _reading(t="2026-05-01T00:02:00Z")
    p = _problem(api.post("/v1/readings", headers=api.operator,
                          json={"readings": [ok, 5, ok, "x", None]}))
    assert [e["row"] for e in p["errors"]] == [1, 3, 4], p


# ----------------------------------------------------------------------------- D17


def test_d17_year_one_is_echoed_as_iso_8601(api, program):
    """D17: strftime("%Y") wrote year 1 as "1-01-01T00:00:00Z"."""
    r = _control(api, program, start="0001-01-01T00:00:00Z")
    assert r.status_code == 201, r.text
    assert r.json()["start"] == "0001-01-01T00:00:00Z"


# ============================================================================ not in the
# sweep's patches: fixed after it (D9's 403, D13's CSV rows, D14, D15, D16, control replay)


@pytest.mark.parametrize("path,scope", [("/v1/devices", "reader"), ("/v1/devices", "operator"),
                                        ("/v1/feeders", "reader"),
                                        (f"{SEP}/programs/1/controls", "reader")])
def test_d09_a_valid_token_without_the_scope_and_a_malformed_body_is_403(api, program, path,
                                                                         scope):
    """D9: the scope dependency ran after FastAPI decoded the body: '{' got 422, not 403."""
    r = api.post(path, headers={**getattr(api, scope), **JSON}, content=b"{")
    assert "does not allow" in _problem(r, 403)["detail"]
    # with the scope, the malformed body is still a 422
    r = api.post("/v1/devices", headers={**api.admin, **JSON}, content=b"{")
    _problem(r, 422)


_CSV_HEAD = "series,quantity,unit,t,value\n"


@pytest.mark.parametrize("rows,bad", [
    (["sweep-m1,p,kW,2026-05-02T00:00:00Z,1", "sweep-m1,p,kW,2026-05-02T00:00:01Z,1,extra",
      "sweep-m1,p,kW,2026-05-02T00:00:02Z,1", "sweep-m1,p,kW,2026-05-02T00:00:03Z,1,x,y"],
     [1, 3]),
    (["sweep-m1,p,kW,2026-05-02T00:00:00Z,1,extra", "sweep-m1,p,kW,2026-05-02T00:00:01Z,1"],
     [0]),  # pandas took the first column as the index
    (["sweep-m1,p,kW,2026-05-02T00:00:00Z,1", 'sweep-m1,p,"kW,2026-05-02T00:00:01Z,1',
      "sweep-m1,p,kW,2026-05-02T00:00:02Z,1"], [1]),  # a quote left open
])
def test_d13_csv_structural_errors_list_the_rows(api, meter, rows, bad):
    """D13: an extra field or an open quote was a 422 without an ``errors`` list."""
    r = api.post("/v1/readings", headers={**api.operator, "Content-Type": "text/csv"},
                 content=_CSV_HEAD + "\n".join(rows) + "\n")
    p = _problem(r)
    assert [e["row"] for e in p["errors"]] == bad, p
    assert p["accepted"] == 0 and all(e["field"] == "*" for e in p["errors"])
    q = {"series": meter, "quantity": "p_kw", "start": "2026-05-02T00:00:00Z",
         "end": "2026-05-02T00:01:00Z"}
    assert api.get("/v1/readings", headers=api.reader, params=q).json()["rows"] == 0


def test_d14_duplicate_json_keys_are_422_on_every_json_route(api, program):
    """D14: outside /v1/readings an object naming a field twice kept the last value."""
    i = _u()
    r = api.post("/v1/feeders", headers={**api.admin, **JSON},
                 content=f'{{"feeder_id": "dupA{i}", "feeder_id": "dupB{i}"}}')
    assert "'feeder_id' twice" in _problem(r)["detail"]
    for f in (f"dupA{i}", f"dupB{i}"):
        assert api.get(f"/v1/feeders/{f}/models", headers=api.reader).status_code == 404
    # nested, and with white space around the colon
    body = json.dumps({"start": _soon(), "duration_s": 60, "export_limit_w": 5.0,
                       "end_device_id": program["edev"]})
    body = body[:-1] + ', "export_limit_w" :  6.0}'
    r = api.post(f"{SEP}/programs/{program['program_id']}/controls",
                 headers={**api.operator, **JSON}, content=body)
    assert "'export_limit_w' twice" in _problem(r)["detail"]
    # /v1/readings keeps its own check
    r = api.post("/v1/readings", headers={**api.operator, **JSON},
                 content=json.dumps([_reading(t="2026-05-02T00:05:00Z")])[:-2]
                 + ', "value": 2}]')
    assert "twice" in _problem(r)["detail"]
    # text that looks like a key inside a string value is no duplicate
    r = api.post("/v1/feeders", headers=api.admin,
                 json={"feeder_id": f"ok{i}", "name": 'x", "feeder_id": y'})
    assert r.status_code == 201, r.text


def test_d15_a_huge_reading_does_not_break_bucketed_reads(api):
    """D15: PostgreSQL's avg(float8) overflowed (it sums squares too): every bucketed read of
    the window was a 422; SQLite's avg of two 1e308 was Inf (null in the JSON)."""
    m = f"d15-{_u()}"
    assert api.post("/v1/meters", headers=api.admin, json={"meter_id": m}).status_code == 201
    rows = [_reading(series=m, t="2026-05-03T00:00:00Z", value=1e308),
            _reading(series=m, t="2026-05-03T00:00:01Z", value=1.7e308),
            _reading(series=m, t="2026-05-03T00:20:00Z", value=0.1),
            _reading(series=m, t="2026-05-03T00:20:01Z", value=0.2)]
    r = api.post("/v1/readings", headers=api.operator, json=rows)
    assert r.status_code == 200, r.text
    q = {"series": m, "quantity": "p_kw", "start": "2026-05-03T00:00:00Z",
         "end": "2026-05-03T01:00:00Z", "bucket": "15min"}
    r = api.get("/v1/readings", headers=api.reader, params=q)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["n"] == [2, 2]
    assert got["value"] == [pytest.approx(1.35e308, rel=1e-15), pytest.approx(0.15, rel=1e-15)]


def test_d16_nul_characters_are_422_naming_the_field(api, program):
    """D16: text fields without a NUL check: SQLite stored "a\\x00b", PostgreSQL gave a
    generic 422 naming no field."""
    h = datetime.now(UTC) + timedelta(hours=1)
    der = f"d16-{_u()}"
    r = api.post("/v1/devices", headers=api.admin, json={
        "der_id": der, "site_id": f"s-{der}", "der_type": "battery", "s_max_kva": 10,
        "p_gen_max_kw": 5, "p_charge_max_kw": 5, "e_max_kwh": 10})
    assert r.status_code == 201, r.text
    cases = [
        ("/v1/operator/overrides", {"scope": {"kind": "device", "der_id": der},
                                    "value_kw": 1.0, "expiry": h.isoformat(),
                                    "reason": "a\u0000b"}, "reason"),
        (f"{SEP}/programs/{program['program_id']}/dispatch",
         {"schedule": {"der_id": ["a\u0000b"], "timestamp": [_soon()], "p_kw": [1.0]},
          "step_s": 900}, "der_id"),
        (f"{SEP}/function-set-assignments/1/end-devices",
         {"connection_points": ["NMI\u0000"]}, "connection_points"),
    ]
    for path, body, field in cases:
        p = _problem(api.post(path, headers=api.admin, json=body))
        assert any(field in e["field"] + e["detail"] for e in p.get("errors", [])), (path, p)
    listed = api.get("/v1/control/requests", headers=api.reader,
                     params={"open": "true"}).json()["items"]
    assert not [x for x in listed if der in json.dumps(x)]


def test_reposting_an_identical_control_is_200_with_the_same_record(api, program):
    """The docstring promised 200 semantics for an identical re-post; it answered 201."""
    body = {"mrid": _hex32(), "description": "replay"}
    first = _control(api, program, **body)
    assert first.status_code == 201, first.text
    again = _control(api, program, **body, start=first.json()["start"])
    assert again.status_code == 200, again.text
    assert again.json()["control_id"] == first.json()["control_id"]
    other = _control(api, program, **body, start=first.json()["start"], export_limit_w=7.0)
    _problem(other, 409)
