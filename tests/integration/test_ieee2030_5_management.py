"""IEEE 2030.5 management API (``/v1/ieee2030-5``) and its wiring into ``derms serve``.

In process: the routes over an in-memory repository (scopes, problem+json, idempotent
publishing of operating envelopes as DERControls, what a device then sees through
:class:`SepApp`). Acceptance: ``derms serve --ieee2030-5-port`` as a subprocess with
certificates from ``derms certs``; devices pre-registered and envelopes published through
the management API; py20305's independent client (PyPI) registers and discovers its
programs and controls over mutual TLS and finds its envelope; another device cannot see it.
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from lxml import etree
from typer.testing import CliRunner

from derms.analysis.envelope_network import ConnectionPoint
from derms.analysis.envelopes import EnvelopeCriteria, EnvelopeResult
from derms.api.app import create_app
from derms.api.routes_capacity import _columns as envelope_columns
from derms.cli.main import app as cli
from derms.config import get_settings
from derms.protocols.ieee2030_5 import InMemoryRepository, SepApp, SepSettings
from derms.protocols.ieee2030_5.http11 import Request
from derms.protocols.ieee2030_5.identity import ClientIdentity, sfdi_from_lfdi
from derms.protocols.ieee2030_5.model import DerLimits
from derms.protocols.ieee2030_5.sep_xml import CSIPAUS_NS, NS, validation_errors
from derms.store.migrate import upgrade
from tests.integration.conftest import mint_token

Q = f"{{{NS}}}"
A = f"{{{CSIPAUS_NS}}}"
LFDI_1, LFDI_2, LFDI_AGG = "A1" * 20, "B2" * 20, "C3" * 20


def site_controls(now: datetime, cps: list[str], steps: int = 3, step_s: int = 300,
                  first: int = -1) -> pd.DataFrame:
    """Real ``EnvelopeResult.site_controls()`` rows: ``steps`` intervals from ``first``
    steps before the current one, distinct W values per connection point and interval."""
    t0 = pd.Timestamp(now).floor(f"{step_s}s") + pd.Timedelta(seconds=first * step_s)
    times = pd.date_range(t0, periods=steps, freq=f"{step_s}s", tz="UTC")
    n = len(cps)
    exp = np.array([[1.5 + k + 10 * j for j in range(n)] for k in range(steps)])
    imp = exp + 0.25
    res = EnvelopeResult(
        times=times,
        cps=tuple(ConnectionPoint(c, f"load.{c}", c, (1,), 1, "wye", 0.24, 5.0, 1.0, 20.0)
                  for c in cps),
        export_kw=exp, import_kw=imp, intervals=pd.DataFrame(), pre_existing=pd.DataFrame(),
        criteria=EnvelopeCriteria(), runtime_s=0.0, n_ac_solves=0,
        forecast_p_kw=np.zeros((steps, n)))
    return res.site_controls()


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('sep-api') / 'derms.db'}"
    upgrade(url)
    app = create_app(get_settings(database_url=url))
    with TestClient(app) as client:
        yield {"client": client, "app": app, "admin": mint_token(url, "admin"),
               "operate": mint_token(url, "operate"), "read": mint_token(url, "read")}


@pytest.fixture()
def repo(api):
    api["app"].state.ieee2030_5_repo = repo = InMemoryRepository()
    yield repo
    api["app"].state.ieee2030_5_repo = None


def _problem(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    return resp.json()


def test_without_the_listener_the_routes_answer_503(api):
    api["app"].state.ieee2030_5_repo = None
    r = api["client"].get("/v1/ieee2030-5/end-devices", headers=api["read"])
    assert "--ieee2030-5-port" in _problem(r, 503)["detail"]


def test_management_routes(api, repo):
    c, admin, operate, read = api["client"], api["admin"], api["operate"], api["read"]
    base = "/v1/ieee2030-5"
    r = c.post(f"{base}/end-devices", headers=admin,
               json={"lfdi": LFDI_1.lower(), "pin": 123455, "connection_point": "NMI-1",
                     "aggregator_lfdi": LFDI_AGG})
    assert r.status_code == 201, r.text
    dev = r.json()
    assert dev["lfdi"] == LFDI_1 and dev["sfdi"] == sfdi_from_lfdi(LFDI_1)
    assert repo.is_aggregator(LFDI_AGG)  # owning devices makes a client an aggregator
    _problem(c.post(f"{base}/end-devices", headers=admin, json={"lfdi": LFDI_1}), 409)
    bad = _problem(c.post(f"{base}/end-devices", headers=admin, json={"lfdi": "XYZ"}), 422)
    assert bad["errors"][0]["field"].endswith("lfdi")
    _problem(c.post(f"{base}/end-devices", headers=operate, json={"lfdi": LFDI_2}), 403)
    _problem(c.post(f"{base}/end-devices", json={"lfdi": LFDI_2}), 401)
    _problem(c.post(f"{base}/end-devices", headers=admin,
                    json={"lfdi": LFDI_2, "connection_point": "x" * 33}), 422)
    assert c.post(f"{base}/end-devices", headers=admin,
                  json={"lfdi": LFDI_2, "connection_point": "NMI-2"}).status_code == 201

    prog = c.post(f"{base}/programs", headers=admin, json={"description": "DOE",
                                                           "primacy": 1}).json()
    _problem(c.post(f"{base}/programs", headers=admin, json={"primacy": 256}), 422)
    fsa = c.post(f"{base}/function-set-assignments", headers=admin,
                 json={"description": "sites", "program_ids": [prog["program_id"]]}).json()
    _problem(c.post(f"{base}/function-set-assignments", headers=admin,
                    json={"program_ids": [999]}), 422)
    r = c.post(f"{base}/function-set-assignments/{fsa['fsa_id']}/end-devices", headers=admin,
               json={"connection_points": ["NMI-1", "NMI-2"]})
    assert r.status_code == 200 and len(r.json()["end_device_ids"]) == 2, r.text
    _problem(c.post(f"{base}/function-set-assignments/{fsa['fsa_id']}/end-devices",
                    headers=admin, json={"connection_points": ["NMI-404"]}), 422)
    _problem(c.post(f"{base}/function-set-assignments/77/end-devices", headers=admin,
                    json={"end_device_ids": [1]}), 404)
    listed = c.get(f"{base}/end-devices?connection_point=NMI-1", headers=read).json()
    assert listed["total"] == 1 and listed["items"][0]["fsa_ids"] == [fsa["fsa_id"]]

    pid = prog["program_id"]
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    body = {"start": start.isoformat(), "duration_s": 1800, "randomize_start_s": 30,
            "export_limit_w": 0, "generation_limit_w": 2500.5, "description": "curtail"}
    r = c.post(f"{base}/programs/{pid}/controls", headers=operate, json=body)
    assert r.status_code == 201, r.text
    ctl = r.json()
    assert (ctl["status"], ctl["export_limit_w"], ctl["generation_limit_w"]) == (
        "scheduled", 0, 2500.5)
    _problem(c.post(f"{base}/programs/{pid}/controls", headers=read, json=body), 403)
    naive = {**body, "start": start.replace(tzinfo=None).isoformat()}
    _problem(c.post(f"{base}/programs/{pid}/controls", headers=operate, json=naive), 422)
    _problem(c.post(f"{base}/programs/{pid}/controls", headers=operate,
                    json={"start": start.isoformat(), "duration_s": 60}), 422)  # no limit
    _problem(c.post(f"{base}/programs/{pid}/controls", headers=operate,
                    json={**body, "export_limit_w": -1}), 422)
    _problem(c.post(f"{base}/programs/99/controls", headers=operate, json=body), 404)
    r = c.put(f"{base}/programs/{pid}/default-control", headers=admin,
              json={"export_limit_w": 1500, "import_limit_w": 10000, "set_grad_w": 27})
    assert r.status_code == 200 and r.json()["version"] == 0, r.text
    assert c.get(f"{base}/programs/{pid}/default-control",
                 headers=read).json()["export_limit_w"] == 1500
    cancelled = c.post(f"{base}/controls/{ctl['control_id']}/cancel", headers=operate).json()
    assert cancelled["status"] == "cancelled" and cancelled["version"] == 1
    _problem(c.post(f"{base}/controls/999/cancel", headers=operate), 404)
    assert c.get(f"{base}/programs/{pid}/controls", headers=read).json()["total"] == 1
    assert c.get(f"{base}/programs", headers=read).json()["items"][0]["primacy"] == 1
    assert c.get("/openapi.json").json()["paths"].get(f"{base}/programs/{{program_id}}/envelopes")


def _sep(repo: InMemoryRepository, lfdi: str, method: str, path: str, body: bytes = b"",
         content_type: str | None = "application/sep+xml"):
    """One request through the 2030.5 app in process (identity given, no TLS)."""
    ident = ClientIdentity(lfdi=lfdi, sfdi=sfdi_from_lfdi(lfdi), cert_der=b"")
    headers = {"content-type": content_type} if content_type else {}
    resp = SepApp(repo, SepSettings())(Request(method, path, {"l": "50"}, headers, body,
                                               ident))
    return asyncio.run(resp) if asyncio.iscoroutine(resp) else resp


def _sep_get(repo: InMemoryRepository, lfdi: str, path: str) -> etree._Element | int:
    """GET: the (schema-valid) document, or the status when it is not 200."""
    resp = _sep(repo, lfdi, "GET", path)
    if resp.status != 200:
        return resp.status
    assert validation_errors(resp.body) == []
    return etree.fromstring(resp.body)


def test_der_reports_put_by_the_device_are_validated_and_stored(api, repo):
    e1 = repo.add_end_device(LFDI_1).edev_id
    e2 = repo.add_end_device(LFDI_2).edev_id
    edev = _sep_get(repo, LFDI_1, f"/edev/{e1}")
    ders = _sep_get(repo, LFDI_1, edev.find(f"{Q}DERListLink").get("href"))
    der = _sep_get(repo, LFDI_1, ders.find(f"{Q}DER").get("href"))
    status_href = der.find(f"{Q}DERStatusLink").get("href")
    assert status_href == f"/edev/{e1}/der/1/ders"
    assert _sep_get(repo, LFDI_1, status_href) == 404  # nothing reported yet
    good = (b'<DERStatus xmlns="urn:ieee:std:2030.5:ns"><readingTime>1795648428</readingTime>'
            b'<stateOfChargeStatus><dateTime>1</dateTime><value>5000</value>'
            b'</stateOfChargeStatus></DERStatus>')
    bad = {
        400: [b"<DERStatus", good.replace(b"DERStatus", b"DERSettings"),
              good.replace(b"<DERStatus ", b'<DERStatus schemaVer="two" '),  # not a version
              good.replace(b"<readingTime>1795648428</readingTime>", b"")],
        404: [],
    }
    for body in bad[400]:
        assert _sep(repo, LFDI_1, "PUT", status_href, body).status == 400, body
    assert _sep(repo, LFDI_1, "PUT", status_href, good, "application/xml").status == 415
    assert _sep(repo, LFDI_2, "PUT", status_href, good).status == 404  # not its device
    assert _sep(repo, LFDI_1, "PUT", f"/edev/{e1}/der/2/ders", good).status == 404
    resp = _sep(repo, LFDI_1, "POST", status_href, good)
    assert resp.status == 405 and dict(resp.headers)["allow"] == "GET, PUT"
    assert repo.der_document(e1, "ders") is None and repo.der_document(e2, "ders") is None
    assert _sep(repo, LFDI_1, "PUT", status_href, good).status == 204
    stored = _sep_get(repo, LFDI_1, status_href)
    assert stored.get("href") == status_href
    assert stored.findtext(f"{Q}stateOfChargeStatus/{Q}value") == "5000"
    v2023 = good.replace(b"<DERStatus ", b'<DERStatus schemaVer="2.2" ')  # 2023-edition client
    assert _sep(repo, LFDI_1, "PUT", status_href, v2023).status == 204
    r = api["client"].get(f"/v1/ieee2030-5/end-devices/{e1}/der/status", headers=api["read"])
    assert r.json()["document"]["stateOfChargeStatus"] == {"dateTime": "1", "value": "5000"}
    _problem(api["client"].get(f"/v1/ieee2030-5/end-devices/{e2}/der/status",
                               headers=api["read"]), 404)
    _problem(api["client"].get(f"/v1/ieee2030-5/end-devices/{e1}/der/other",
                               headers=api["read"]), 422)


def test_responses_to_events(api, repo):
    pid = repo.add_program("DOE", 1).program_id
    fsa = repo.add_fsa("sites", [pid]).fsa_id
    e1 = repo.add_end_device(LFDI_1, nmi="s1a", fsa_ids=[fsa]).edev_id
    e2 = repo.add_end_device(LFDI_2, nmi="s2b", fsa_ids=[fsa]).edev_id
    ctl = repo.add_control(pid, datetime.now(UTC), 600, DerLimits(exp_lim_w=100),
                           connection_point="s1a")
    derc = _sep_get(repo, LFDI_1, f"/edev/{e1}/derp/{pid}/derc/{ctl.control_id}")
    assert (derc.get("replyTo"), derc.get("responseRequired")) == ("/rsps/1/rsp", "03")

    def body(lfdi: str, mrid: str, status: int = 1) -> bytes:
        return (f'<DERControlResponse xmlns="urn:ieee:std:2030.5:ns"><createdDateTime>'
                f'1795648428</createdDateTime><endDeviceLFDI>{lfdi}</endDeviceLFDI><status>'
                f'{status}</status><subject>{mrid}</subject></DERControlResponse>').encode()

    first = _sep(repo, LFDI_1, "POST", "/rsps/1/rsp", body(LFDI_1, ctl.mrid))
    assert first.status == 201
    again = _sep(repo, LFDI_1, "POST", "/rsps/1/rsp", body(LFDI_1, ctl.mrid))
    assert dict(again.headers)["location"] == dict(first.headers)["location"]
    assert _sep(repo, LFDI_1, "POST", "/rsps/1/rsp", body(LFDI_1, ctl.mrid, 2)).status == 201
    assert _sep(repo, LFDI_2, "POST", "/rsps/1/rsp", body(LFDI_1, ctl.mrid)).status == 403
    assert _sep(repo, LFDI_2, "POST", "/rsps/1/rsp", body(LFDI_2, ctl.mrid)).status == 400
    assert _sep(repo, LFDI_1, "POST", "/rsps/1/rsp", body(LFDI_1, "AB" * 16)).status == 400
    assert _sep(repo, LFDI_1, "POST", "/rsps/1/rsp", b"<DERControlResponse").status == 400
    assert _sep(repo, LFDI_1, "POST", "/rsps/1/rsp", body(LFDI_1, ctl.mrid),
                "text/xml").status == 415
    assert len(repo.responses()) == 2
    assert _sep_get(repo, LFDI_1, "/rsps/1/rsp").get("all") == "2"
    assert _sep_get(repo, LFDI_2, "/rsps/1/rsp").get("all") == "0"
    location = dict(first.headers)["location"]
    assert _sep_get(repo, LFDI_1, location).findtext(f"{Q}subject") == ctl.mrid
    assert _sep_get(repo, LFDI_2, location) == 404 and e2
    r = api["client"].get(f"/v1/ieee2030-5/controls/{ctl.control_id}/responses",
                          headers=api["read"]).json()
    assert [i["status_name"] for i in r["items"]] == ["received", "started"]


def test_envelopes_become_der_controls_of_the_devices_at_the_connection_point(api, repo):
    c, admin, operate = api["client"], api["admin"], api["operate"]
    base = "/v1/ieee2030-5"
    pid = c.post(f"{base}/programs", headers=admin, json={"primacy": 1}).json()["program_id"]
    fsa = c.post(f"{base}/function-set-assignments", headers=admin,
                 json={"program_ids": [pid]}).json()["fsa_id"]
    for lfdi, cp in ((LFDI_1, "s1a"), (LFDI_2, "s2b")):
        c.post(f"{base}/end-devices", headers=admin,
               json={"lfdi": lfdi, "connection_point": cp, "fsa_ids": [fsa]})
    frame = site_controls(datetime.now(UTC), ["s1a", "s2b", "s3c"], steps=3)
    body = {"site_controls": envelope_columns(frame, 0, 10_000)}  # as POST /v1/envelopes
    r = c.post(f"{base}/programs/{pid}/envelopes", headers=operate, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["rows"], out["created"], out["unchanged"]) == (9, 6, 0)
    assert out["unmatched_connection_points"] == ["s3c"]
    assert out["end_devices_without_program"] == []
    again = c.post(f"{base}/programs/{pid}/envelopes", headers=operate, json=body).json()
    assert (again["created"], again["unchanged"]) == (0, 6)
    stored = {ctl.mrid: ctl for ctl in repo.controls(pid)}
    for row in frame.itertuples():
        if row.connection_point == "s3c":
            assert row.mrid not in stored
            continue
        ctl = stored[row.mrid]
        assert ctl.connection_point == row.connection_point and ctl.edev_id is None
        assert ctl.start == row.start.to_pydatetime() and ctl.duration_s == row.duration_s
        assert (ctl.limits.exp_lim_w, ctl.limits.imp_lim_w) == (row.export_limit_w,
                                                                 row.import_limit_w)
    # the rows format, with a direction not computed (NaN → null)
    one = frame[frame.connection_point == "s1a"].iloc[-1:].assign(import_limit_w=np.nan)
    rows = [{**r, "start": r["start"].isoformat(), "import_limit_w": None,
             "mrid": "0" * 32} for r in one.to_dict("records")]
    r = c.post(f"{base}/programs/{pid}/envelopes", headers=operate,
               json={"site_controls": rows})
    assert r.json()["created"] == 1, r.text
    # all or nothing: bad rows are listed, nothing stored
    n_before = len(repo.controls(pid))
    bad = [{**rows[0], "mrid": "1" * 32}, {**rows[0], "mrid": "nothex"},
           {**rows[0], "mrid": "2" * 32, "export_limit_w": None},
           {**rows[0], "mrid": "3" * 32, "duration_s": 0}]
    p = _problem(c.post(f"{base}/programs/{pid}/envelopes", headers=operate,
                        json={"site_controls": bad}), 422)
    assert {(e["row"], e["field"]) for e in p["errors"]} == {
        (1, "mrid"), (2, "export_limit_w"), (3, "duration_s")}
    assert len(repo.controls(pid)) == n_before
    clash = [{**rows[0], "export_limit_w": 1.0}]  # the same mRID, other content
    _problem(c.post(f"{base}/programs/{pid}/envelopes", headers=operate,
                    json={"site_controls": clash}), 409)
    short = {**body["site_controls"], "mrid": body["site_controls"]["mrid"][:-1]}
    _problem(c.post(f"{base}/programs/{pid}/envelopes", headers=operate,
                    json={"site_controls": short}), 422)

    # what each device sees through the 2030.5 resources
    e1 = repo.end_device_by_lfdi(LFDI_1).edev_id
    e2 = repo.end_device_by_lfdi(LFDI_2).edev_id
    derc = _sep_get(repo, LFDI_1, f"/edev/{e1}/derp/{pid}/derc")
    seen = {d.findtext(f"{Q}mRID"): d for d in derc}
    current = frame[(frame.connection_point == "s1a")
                    & (frame.start + pd.to_timedelta(frame.duration_s, "s")
                       > pd.Timestamp.now(tz="UTC"))]
    assert set(current.mrid) | {"0" * 32} == set(seen)
    for row in current.itertuples():
        base_el = seen[row.mrid].find(f"{Q}DERControlBase")
        value = base_el.find(f"{A}opModExpLimW")
        assert float(value.findtext(f"{Q}value")) * 10 ** int(
            value.findtext(f"{Q}multiplier")) == pytest.approx(row.export_limit_w, abs=5)
    assert _sep_get(repo, LFDI_1, f"/edev/{e2}/derp/{pid}/derc") == 404
    seen2 = {d.findtext(f"{Q}mRID") for d in _sep_get(repo, LFDI_2,
                                                        f"/edev/{e2}/derp/{pid}/derc")}
    assert seen2 and not seen2 & set(seen)


# ----------------------------------------------------------------------------- acceptance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def test_serve_refuses_bad_ieee2030_5_options(tmp_path, monkeypatch):
    """Checked before anything starts: exit 2 with a message naming option and file."""
    monkeypatch.setenv("DERMS_DATABASE_URL", f"sqlite:///{tmp_path / 'd.db'}")
    monkeypatch.setenv("DERMS_DATA_DIR", str(tmp_path))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    pki = tmp_path / "pki"
    assert CliRunner().invoke(cli, ["certs", str(pki)]).exit_code == 0
    sep = ["--ieee2030-5-port", "8443"]

    def files(cert, key, ca):
        return ["--ieee2030-5-cert", str(cert), "--ieee2030-5-key", str(key),
                "--ieee2030-5-client-ca", str(ca)]

    cases = {
        "needs --ieee2030-5-cert, --ieee2030-5-key": [*sep, "--ieee2030-5-client-ca", str(junk)],
        "none.pem: cannot be read (No such file": [*sep, *files(tmp_path / "none.pem", junk,
                                                                junk)],
        "no PEM CA certificate": [*sep, *files(junk, junk, junk)],
        "not a PEM certificate and its unencrypted private key": [
            *sep, *files(pki / "server.pem", pki / "ca.key", pki / "ca.pem")],
        "expected /…/dcap": [*sep, *files(pki / "server.pem", pki / "server.key",
                                          pki / "ca.pem"), "--ieee2030-5-dcap-path", "/x"],
        "--ieee2030-5-cert is given without --ieee2030-5-port": ["--ieee2030-5-cert", str(junk)],
    }
    for expected, extra in cases.items():
        result = CliRunner().invoke(cli, ["serve", "--no-mqtt", *extra])
        message = "".join(result.output.split())  # the console wraps long lines anywhere
        assert result.exit_code == 2, (expected, result.output, result.exception)
        assert "".join(expected.split()) in message, result.output
        assert "Traceback" not in message, result.output
    assert not (tmp_path / "d.db").exists()  # refused before the database is touched


class _Served:
    """``derms serve`` with the 2030.5 listener, as a subprocess; always terminated."""

    def __init__(self, env: dict, pki: Path) -> None:
        self.port, self.sep_port = _free_port(), _free_port()
        self.log = open(pki.parent / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "derms.cli.main", "serve", "--port", str(self.port),
             "--no-mqtt", "--ieee2030-5-port", str(self.sep_port),
             "--ieee2030-5-cert", str(pki / "server.pem"),
             "--ieee2030-5-key", str(pki / "server.key"),
             "--ieee2030-5-client-ca", str(pki / "ca.pem"),
             "--ieee2030-5-dcap-path", "/sep2/dcap"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"derms serve exited with {self.proc.returncode}")
            try:
                ok = httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=1).status_code
                if ok == 200:
                    # the listener starts before the API, so it is up; check anyway
                    socket.create_connection(("127.0.0.1", self.sep_port), timeout=1).close()
                    return
            except (httpx.TransportError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError("derms serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


def _discover(pki: Path, name: str, lfdi: str, port: int, pin: int, after=None):
    """py20305's discovery walk as ``name`` (its Sep2Client over mutual TLS, in its
    IEEE 2030.5-2018 mode, the edition this server's schema is); then ``after(client,
    state)`` on the same client. Returns (state, what ``after`` returned)."""
    from py20305.client.discovery import discover
    from py20305.client.http import Sep2Client
    from py20305.client.state import DiscoveredState
    from py20305.client.tls import TlsConfig

    async def run():
        tls = TlsConfig(client_cert=pki / f"{name}.pem", client_key=pki / f"{name}.key",
                        ca_cert=pki / "ca.pem")
        client = Sep2Client(f"https://localhost:{port}", tls=tls, server_2018_compat=True)
        state = DiscoveredState()
        try:
            await discover(client, state, registration_pins={lfdi: pin, lfdi.lower(): pin},
                           dcap_path="/sep2/dcap")
            extra = await after(client, state) if after else None
        finally:
            await client.close()
        return state, extra

    return asyncio.run(run())


async def _put_der_reports(client, state) -> dict[str, int]:
    """PUT DERCapability, DERSettings, DERStatus, DERAvailability as py20305 builds them."""
    from py20305.telemetry.der_availability import build_der_availability
    from py20305.telemetry.der_capability import build_der_capability
    from py20305.telemetry.der_settings import build_der_settings
    from py20305.telemetry.der_status import build_der_status

    # discovery records the CSIP-AUS profile in the state; the client's serialiser must be
    # told (otherwise it writes csipaus elements first, out of schema order)
    client.csip_aus_mode = state.csip_aus_mode
    (edev,) = state.end_devices.values()
    w = {"value": 5000, "multiplier": 0}
    docs = {
        edev.der_capability_href: build_der_capability({"WMaxRtg": w, "VAMaxRtg": w},
                                                       csip_aus_mode=True),
        edev.der_settings_href: build_der_settings({"WMax": w}, csip_aus_mode=True),
        edev.der_status_href: build_der_status(
            {"genConnectStatus": {"dateTime": 1, "value": 1},
             "stateOfChargeStatus": {"dateTime": 1, "value": 5000}}, server_2018_compat=True),
        edev.der_availability_href: build_der_availability(
            {"statWAvail": {"value": 3000, "multiplier": 0}}),
    }
    assert None not in docs, docs
    statuses = {href: await client.put(href, doc) for href, doc in docs.items()}
    # acknowledge every control received, as py20305's event processor does
    from py20305.events.response import ResponseCode, ResponseTracker, post_der_response

    tracker = ResponseTracker()
    for program in state.der_programs.values():
        for derc in program.der_controls:
            await post_der_response(client, derc, ResponseCode.ACKNOWLEDGED, edev.lfdi, tracker)
    return statuses


def _mrid(control) -> str:
    """py20305 keeps mRIDs as an object holding the 16 bytes."""
    return control.m_rid.value.hex().upper()


def _w(value_multiplier: tuple[int, int]) -> float:
    value, multiplier = value_multiplier
    return value * 10.0**multiplier


def test_acceptance_serve_envelopes_reach_a_real_client_over_mutual_tls(tmp_path):
    from py20305.models.csipaus.elements import doe_limits

    t_start = time.monotonic()
    pki = tmp_path / "pki"
    result = CliRunner().invoke(cli, ["certs", str(pki), "--device", "site1",
                                      "--device", "site2"])
    assert result.exit_code == 0, result.output
    with (pki / "identities.csv").open() as fh:
        ids = {r["name"]: r for r in csv.DictReader(fh)}
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    env = {**os.environ, "DERMS_DATABASE_URL": url, "DERMS_DATA_DIR": str(tmp_path)}
    served = _Served(env, pki)
    try:
        served.wait_ready()
        admin, operate = mint_token(url, "admin"), mint_token(url, "operate")
        api = f"http://127.0.0.1:{served.port}/v1/ieee2030-5"
        with httpx.Client(timeout=10) as h:
            pid = h.post(f"{api}/programs", headers=admin,
                         json={"description": "CSIP-AUS DOE", "primacy": 1}).json()["program_id"]
            fsa = h.post(f"{api}/function-set-assignments", headers=admin,
                         json={"description": "DOE sites", "program_ids": [pid]}).json()
            for name, cp, pin in (("site1", "4103000001", 111115), ("site2", "4103000002",
                                                                     222220)):
                r = h.post(f"{api}/end-devices", headers=admin, json={
                    "lfdi": ids[name]["lfdi"], "pin": pin, "connection_point": cp})
                assert r.status_code == 201, r.text
            r = h.post(f"{api}/function-set-assignments/{fsa['fsa_id']}/end-devices",
                       headers=admin, json={"connection_points": ["4103000001", "4103000002"]})
            assert r.status_code == 200, r.text
            r = h.put(f"{api}/programs/{pid}/default-control", headers=admin,
                      json={"export_limit_w": 1500, "import_limit_w": 10000})
            assert r.status_code == 200, r.text
            frame = site_controls(datetime.now(UTC), ["4103000001", "4103000002"], steps=4)
            r = h.post(f"{api}/programs/{pid}/envelopes", headers=operate,
                       json={"site_controls": envelope_columns(frame, 0, 10_000)})
            assert r.status_code == 200, r.text
            assert r.json()["created"] == 8 and r.json()["unmatched_connection_points"] == []

        # the independent client: registration walk, FSA, programs, controls, default
        state, puts = _discover(pki, "site1", ids["site1"]["lfdi"], served.sep_port,
                                pin=111115, after=_put_der_reports)
        assert state.csip_aus_mode
        (edev,) = state.end_devices.values()
        assert edev.lfdi.hex().upper() == ids["site1"]["lfdi"]
        assert len(edev.fsa_list) == 1
        (program,) = state.der_programs.values()
        assert program.primacy == 1 and program.default_dercontrol is not None
        now = pd.Timestamp.now(tz="UTC")
        mine = frame[(frame.connection_point == "4103000001")
                     & (frame.start + pd.to_timedelta(frame.duration_s, "s") > now)]
        got = {_mrid(c): c for c in program.der_controls}
        assert set(got) == set(mine.mrid), (set(got), list(mine.mrid))
        for row in mine.itertuples():
            ctl = got[row.mrid]
            assert ctl.interval.start.value == int(row.start.timestamp())
            assert ctl.interval.duration == row.duration_s
            limits = doe_limits(ctl.dercontrol_base)  # py20305's own CSIP-AUS reader
            assert _w(limits["opModExpLimW"]) == pytest.approx(row.export_limit_w, abs=5)
            assert _w(limits["opModImpLimW"]) == pytest.approx(row.import_limit_w, abs=5)

        # what the device PUT is stored and readable through the management API
        assert set(puts.values()) == {204}, puts
        read = mint_token(url, "read")
        with httpx.Client(timeout=10) as h:
            edev_id = int(edev.href.rsplit("/", 1)[-1])
            r = h.get(f"{api}/end-devices/{edev_id}/der/status", headers=read)
            assert r.status_code == 200, r.text
            assert r.json()["document"]["stateOfChargeStatus"]["value"] == "5000"
            settings = h.get(f"{api}/end-devices/{edev_id}/der/settings", headers=read).json()
            assert settings["document"]["setMaxW"] == {"multiplier": "0", "value": "5000"}
            assert h.get(f"{api}/end-devices/{edev_id}/der/availability",
                         headers=read).status_code == 200
            # and its acknowledgements of the envelope controls
            controls = h.get(f"{api}/programs/{pid}/controls?connection_point=4103000001",
                             headers=read).json()["items"]
            acked = {c["mrid"]: h.get(f"{api}/controls/{c['control_id']}/responses",
                                      headers=read).json()["items"] for c in controls}
            assert {m for m, r in acked.items() if r} == set(mine.mrid)
            assert all(r[0]["status_name"] == "received" and r[0]["end_device_id"] == edev_id
                       for r in acked.values() if r)

        # site2's client sees only its own envelope; site1 cannot reach site2's resources
        state2, _ = _discover(pki, "site2", ids["site2"]["lfdi"], served.sep_port, pin=222220)
        (program2,) = state2.der_programs.values()
        theirs = {_mrid(c) for c in program2.der_controls}
        assert theirs and not theirs & set(got)
        (edev2,) = state2.end_devices.values()
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(pki / "site1.pem", pki / "site1.key")
        conn = http.client.HTTPSConnection("localhost", served.sep_port, context=ctx,
                                           timeout=5)
        for path in (edev2.href, f"{edev2.href}/derp/{pid}/derc", f"{edev2.href}/cp"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404, path
        status = f"{edev2.href}/der/1/ders"  # nor report for it
        body = (b'<DERStatus xmlns="urn:ieee:std:2030.5:ns"><readingTime>1</readingTime>'
                b'</DERStatus>')
        conn.request("PUT", status, body=body, headers={"Content-Type": "application/sep+xml"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
        conn.close()
    finally:
        served.stop()
    assert served.proc.returncode is not None
    assert time.monotonic() - t_start < 30
