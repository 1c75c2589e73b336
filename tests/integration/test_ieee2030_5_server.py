"""The IEEE 2030.5 server over real mutual TLS on 127.0.0.1, with certificates made by
``derms certs``: discovery by a device, access rules, TLS failures as alerts, bad input, and
the independent ``py20305`` client (from the package registry) walking the resources.

Every 200 body is validated against the IEEE 2030.5 + CSIP-AUS XSDs."""

from __future__ import annotations

import asyncio
import csv
import http.client
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree
from typer.testing import CliRunner

from derms.cli.main import app as cli
from derms.protocols.ieee2030_5 import (
    Ieee2030_5Config,
    InMemoryRepository,
    SepSettings,
    start_ieee2030_5_server,
)
from derms.protocols.ieee2030_5.certs import create_ca, issue
from derms.protocols.ieee2030_5.model import DerLimits
from derms.protocols.ieee2030_5.sep_xml import CSIPAUS_NS, NS, validation_errors

Q = f"{{{NS}}}"
PIN = 111115


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pki")
    result = CliRunner().invoke(cli, ["certs", str(out), "--device", "dev1", "--device", "dev2",
                                      "--device", "stranger", "--aggregator", "agg1"])
    assert result.exit_code == 0, result.output
    with (out / "identities.csv").open() as fh:
        ids = {r["name"]: r for r in csv.DictReader(fh)}
    other = tmp_path_factory.mktemp("other-ca")
    create_ca(other, common_name="someone else's CA")
    issue(other, "rogue", "device", other / "ca.pem", other / "ca.key")
    issue(out, "expired", "device", out / "ca.pem", out / "ca.key",
          not_before=datetime.now(UTC) - timedelta(days=10), days=1)
    return {"dir": out, "ids": ids, "other": other}


@pytest.fixture(scope="module")
def server(pki):
    ids = pki["ids"]
    repo = InMemoryRepository(pen=40732)
    prog = repo.add_program("CSIP-AUS DOE", primacy=1)
    prog2 = repo.add_program("fleet", primacy=5)
    fsa = repo.add_fsa("all sites", [prog.program_id, prog2.program_id])
    dev1 = repo.add_end_device(ids["dev1"]["lfdi"], pin=PIN, nmi="4103000001",
                               fsa_ids=[fsa.fsa_id])
    dev2 = repo.add_end_device(ids["dev2"]["lfdi"], pin=222227, fsa_ids=[fsa.fsa_id])
    repo.add_aggregator(ids["agg1"]["lfdi"])
    now = datetime.now(UTC)
    repo.add_control(prog.program_id, now - timedelta(minutes=1), 3600,
                     DerLimits(exp_lim_w=5000, imp_lim_w=123456), edev_id=dev1.edev_id,
                     description="dev1 envelope")
    repo.add_control(prog.program_id, now + timedelta(hours=2), 1800,
                     DerLimits(exp_lim_w=0), randomize_start_s=60)
    repo.add_control(prog.program_id, now, 600, DerLimits(exp_lim_w=1), edev_id=dev2.edev_id)
    repo.add_control(prog.program_id, now - timedelta(hours=3), 600, DerLimits(exp_lim_w=2))
    repo.set_default_control(prog.program_id, DerLimits(exp_lim_w=1500, imp_lim_w=10000),
                             set_grad_w=27)
    d = pki["dir"]
    running = start_ieee2030_5_server(
        Ieee2030_5Config(d / "server.pem", d / "server.key", d / "ca.pem", port=0,
                         max_body_bytes=8192, settings=SepSettings(dcap_path="/sep2/dcap")),
        repo)
    yield {"port": running.port, "repo": repo, "dev1": dev1, "dev2": dev2,
           "program": prog}
    running.stop()


def _ctx(pki, name: str, *, tls12: bool = False, ciphers: str | None = None,
         ca_dir: Path | None = None) -> ssl.SSLContext:
    folder = ca_dir or pki["dir"]
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca.pem"))
    ctx.load_cert_chain(folder / f"{name}.pem", folder / f"{name}.key")
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


class Client:
    """A plain HTTPS client (http.client over ssl) with one keep-alive connection."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = "application/sep+xml"):
        headers = {"Accept": "application/sep+xml"}
        if body is not None and content_type:
            headers["Content-Type"] = content_type
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status == 200:
            assert resp.getheader("content-type") == "application/sep+xml"
            assert validation_errors(data) == [], data
        return resp, data

    def get(self, path: str) -> etree._Element:
        resp, data = self.request("GET", path)
        assert resp.status == 200, (path, resp.status)
        return etree.fromstring(data)

    def status(self, method: str, path: str, body: bytes | None = None, **kw) -> int:
        return self.request(method, path, body, **kw)[0].status


@pytest.fixture()
def dev1(pki, server):
    client = Client(server["port"], _ctx(pki, "dev1"))
    yield client
    client.conn.close()


def _href(el, tag):
    return el.find(f"{Q}{tag}").get("href")


def test_device_discovers_its_controls(dev1, server, pki):
    dcap = dev1.get("/sep2/dcap")
    assert dcap.tag == f"{Q}DeviceCapability" and dcap.get("pollRate") == "900"
    tm = dev1.get(_href(dcap, "TimeLink"))
    assert abs(int(tm.findtext(f"{Q}currentTime")) - datetime.now(UTC).timestamp()) < 5
    edevs = dev1.get(_href(dcap, "EndDeviceListLink") + "?l=10")
    assert edevs.get("all") == "1" and edevs.get("results") == "1"  # only its own
    edev = edevs.find(f"{Q}EndDevice")
    assert edev.findtext(f"{Q}lFDI") == pki["ids"]["dev1"]["lfdi"]
    assert edev.findtext(f"{Q}sFDI") == pki["ids"]["dev1"]["sfdi"]
    edev = dev1.get(edev.get("href"))
    assert int(dev1.get(_href(edev, "RegistrationLink")).findtext(f"{Q}pIN")) == PIN
    cp = dev1.get(edev.find(f"{{{CSIPAUS_NS}}}ConnectionPointLink").get("href"))
    assert cp.findtext(f"{{{CSIPAUS_NS}}}connectionPointId") == "4103000001"
    fsas = dev1.get(_href(edev, "FunctionSetAssignmentsListLink"))
    fsa = dev1.get(fsas.find(f"{Q}FunctionSetAssignments").get("href"))
    programs = dev1.get(_href(fsa, "DERProgramListLink") + "?l=10")
    assert programs.get("all") == "2"
    assert [p.findtext(f"{Q}primacy") for p in programs] == ["1", "5"]
    program = dev1.get(programs.find(f"{Q}DERProgram").get("href"))
    controls = dev1.get(_href(program, "DERControlListLink") + "?l=10")
    # its own envelope and the program-wide future control; not dev2's, not the finished one
    assert controls.get("all") == "2"
    first, second = controls.findall(f"{Q}DERControl")
    assert first.findtext(f"{Q}EventStatus/{Q}currentStatus") == "1"  # active
    assert second.findtext(f"{Q}EventStatus/{Q}currentStatus") == "0"  # scheduled
    assert second.findtext(f"{Q}randomizeStart") == "60"
    base = f"{Q}DERControlBase/{{{CSIPAUS_NS}}}"
    assert first.findtext(f"{base}opModExpLimW/{Q}value") == "5000"
    assert first.findtext(f"{base}opModExpLimW/{Q}multiplier") == "0"
    assert first.findtext(f"{base}opModImpLimW/{Q}value") == "12345"  # 123,456 W rounded toward 0: a limit never loosens
    assert first.findtext(f"{base}opModImpLimW/{Q}multiplier") == "1"
    again = dev1.get(first.get("href"))
    assert again.findtext(f"{Q}mRID") == first.findtext(f"{Q}mRID")
    assert again.findtext(f"{Q}mRID").endswith(f"{40732:08X}")
    active = dev1.get(_href(program, "ActiveDERControlListLink") + "?l=10")
    assert active.get("all") == "1"
    default = dev1.get(_href(program, "DefaultDERControlLink"))
    assert default.findtext(f"{base}opModExpLimW/{Q}value") == "1500"
    assert default.findtext(f"{Q}setGradW") == "27"


def test_list_paging(pki, server):
    agg = Client(server["port"], _ctx(pki, "agg1"))
    lfdis = ["AB" * 20, "CD" * 20, "EF" * 20]
    for lfdi in lfdis:
        body = (f'<EndDevice xmlns="urn:ieee:std:2030.5:ns"><lFDI>{lfdi}</lFDI>'
                f'<sFDI>{_sfdi(lfdi)}</sFDI><changedTime>0</changedTime></EndDevice>').encode()
        resp, _ = agg.request("POST", "/sep2/edev", body)
        assert resp.status == 201 and resp.getheader("location").startswith("/sep2/edev/")
    page = agg.get("/sep2/edev")  # l defaults to 1
    assert (page.get("all"), page.get("results")) == ("3", "1")
    page = agg.get("/sep2/edev?s=1&l=5")
    assert [e.findtext(f"{Q}lFDI") for e in page] == lfdis[1:]
    assert agg.get("/sep2/edev?s=9&l=5").get("results") == "0"
    assert agg.get(f"/sep2/edev?a={int(datetime.now(UTC).timestamp()) + 3600}").get("all") == "0"
    assert agg.status("GET", "/sep2/edev?s=-1") == 400
    # the aggregator sees the devices it registered, not dev1
    assert agg.status("GET", f"/sep2/edev/{server['dev1'].edev_id}") == 404


def _sfdi(lfdi: str) -> int:
    from derms.protocols.ieee2030_5.identity import sfdi_from_lfdi

    return sfdi_from_lfdi(lfdi)


def test_device_cannot_see_another_devices_resources(dev1, server):
    other = server["dev2"].edev_id
    program = server["program"].program_id
    for path in (f"/sep2/edev/{other}", f"/sep2/edev/{other}/rg", f"/sep2/edev/{other}/fsa",
                 f"/sep2/edev/{other}/fsa/1/derp", f"/sep2/edev/{other}/derp/{program}/derc",
                 "/sep2/edev/999", f"/sep2/edev/{10**23}", f"/sep2/edev/{10**23}/fsa",
                 f"/sep2/edev/{other}/derp/{10**23}/derc"):
        assert dev1.status("GET", path) == 404, path
    # dev2's site envelope is not reachable under dev1's own tree either
    own = server["dev1"].edev_id
    dev2_control = [c for c in server["repo"].controls(program) if c.edev_id == other][0]
    assert dev1.status("GET", f"/sep2/edev/{own}/derp/{program}/derc/"
                              f"{dev2_control.control_id}") == 404


def test_registration_rules(pki, server):
    repo = server["repo"]
    dev1 = Client(server["port"], _ctx(pki, "dev1"))
    lfdi = pki["ids"]["dev1"]["lfdi"]
    own = (f'<EndDevice xmlns="urn:ieee:std:2030.5:ns"><lFDI>{lfdi}</lFDI><sFDI>{_sfdi(lfdi)}'
           f'</sFDI><changedTime>0</changedTime></EndDevice>').encode()
    resp, _ = dev1.request("POST", "/sep2/edev", own)
    assert resp.status == 201
    assert resp.getheader("location") == f"/sep2/edev/{server['dev1'].edev_id}"
    foreign = own.replace(lfdi.encode(), b"12" * 20).replace(
        str(_sfdi(lfdi)).encode(), str(_sfdi("12" * 20)).encode())
    assert dev1.status("POST", "/sep2/edev", foreign) == 403
    stranger = Client(server["port"], _ctx(pki, "stranger"))
    slfdi = pki["ids"]["stranger"]["lfdi"]
    body = own.replace(lfdi.encode(), slfdi.encode()).replace(
        str(_sfdi(lfdi)).encode(), str(_sfdi(slfdi)).encode())
    assert stranger.status("POST", "/sep2/edev", body) == 403  # not pre-registered
    assert repo.end_device_by_lfdi(slfdi) is None and repo.end_device_by_lfdi("12" * 20) is None
    # a stranger still gets DeviceCapability and an empty EndDeviceList
    assert stranger.get("/sep2/edev").get("all") == "0"


def test_bad_input_is_rejected_and_nothing_stored(pki, server):
    repo = server["repo"]
    agg = Client(server["port"], _ctx(pki, "agg1"))
    before = len(repo.end_devices_visible_to(pki["ids"]["agg1"]["lfdi"]))
    good = (f'<EndDevice xmlns="urn:ieee:std:2030.5:ns"><lFDI>{"77" * 20}</lFDI>'
            f'<sFDI>{_sfdi("77" * 20)}</sFDI><changedTime>0</changedTime></EndDevice>').encode()
    resp, data = agg.request("POST", "/sep2/edev", b"<EndDevice><unclosed></EndDevice>")
    assert resp.status == 400
    assert etree.fromstring(data).findtext(f"{Q}reasonCode") == "0"
    assert validation_errors(data) == []
    invalid = good.replace(b"<changedTime>0</changedTime>", b"")  # changedTime is required
    assert agg.status("POST", "/sep2/edev", invalid) == 400
    wrong_sfdi = good.replace(str(_sfdi("77" * 20)).encode(), b"123")
    assert agg.status("POST", "/sep2/edev", wrong_sfdi) == 400
    assert agg.status("POST", "/sep2/edev", good, content_type="application/xml") == 415
    assert agg.status("POST", "/sep2/edev", good, content_type=None) == 415
    assert agg.status("POST", "/sep2/edev", b"<a>" + b" " * 10000 + b"</a>") == 413
    agg = Client(server["port"], _ctx(pki, "agg1"))  # 413 closes the connection
    assert agg.status("POST", "/sep2/edev",
                      b'<!DOCTYPE x [<!ENTITY e "e">]><EndDevice>&e;</EndDevice>') == 400
    assert len(repo.end_devices_visible_to(pki["ids"]["agg1"]["lfdi"])) == before
    assert repo.end_device_by_lfdi("77" * 20) is None
    assert agg.status("GET", "/sep2/nothing") == 404
    assert agg.status("GET", "/dcap") == 404  # outside the base path
    resp, _ = agg.request("PUT", "/sep2/dcap", good)
    assert resp.status == 405 and resp.getheader("allow") == "GET"
    assert agg.status("DELETE", "/sep2/edev") == 405


def _handshake(pki, port, name, ca_dir=None, tls12=True):
    ctx = _ctx(pki, name, tls12=tls12, ca_dir=ca_dir)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /sep2/dcap HTTP/1.1\r\nHost: localhost\r\n\r\n")
            return tls.recv(100)


def test_certificate_from_another_ca_fails_in_the_handshake(pki, server):
    with pytest.raises(ssl.SSLError, match="ALERT_UNKNOWN_CA|unknown ca"):
        _handshake(pki, server["port"], "rogue", ca_dir=pki["other"])
    # TLS 1.3: the client's handshake ends first, the server's alert arrives on the next read
    with pytest.raises(ssl.SSLError, match="ALERT_UNKNOWN_CA|unknown ca"):
        _handshake(pki, server["port"], "rogue", ca_dir=pki["other"], tls12=False)


def test_expired_certificate_fails_in_the_handshake(pki, server):
    with pytest.raises(ssl.SSLError, match="ALERT_CERTIFICATE_EXPIRED|certificate expired"):
        _handshake(pki, server["port"], "expired")


def test_no_client_certificate_fails_in_the_handshake(pki, server):
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca.pem"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=5) as raw:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|handshake failure"):
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(10)


@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES128-GCM-SHA256"])
def test_csip_cipher_suites_over_tls12(pki, server, suite):
    ctx = _ctx(pki, "dev1", tls12=True, ciphers=suite)
    client = Client(server["port"], ctx)
    client.get("/sep2/dcap")
    assert client.conn.sock.cipher()[0] == suite
    assert client.conn.sock.version() == "TLSv1.2"


def test_identity_comes_from_the_certificate_not_a_header(pki, server):
    client = Client(server["port"], _ctx(pki, "stranger"))
    client.conn.request("GET", f"/sep2/edev/{server['dev1'].edev_id}",
                        headers={"LFDI": pki["ids"]["dev1"]["lfdi"],
                                 "X-SSL-Client-Cert": "dev1"})
    assert client.conn.getresponse().status == 404


def test_independent_py20305_client_discovers_programs_and_controls(pki, server):
    """py20305 (PyPI, Apache-2.0): its Sep2Client over mutual TLS 1.2 and its discovery walk."""
    from py20305.client.discovery import discover
    from py20305.client.http import Sep2Client
    from py20305.client.state import DiscoveredState
    from py20305.client.tls import TlsConfig

    d = pki["dir"]
    lfdi = pki["ids"]["dev1"]["lfdi"]

    async def run():
        tls = TlsConfig(client_cert=d / "dev1.pem", client_key=d / "dev1.key",
                        ca_cert=d / "ca.pem")
        client = Sep2Client(f"https://localhost:{server['port']}", tls=tls)
        state = DiscoveredState()
        try:
            await discover(client, state, registration_pins={lfdi.lower(): PIN, lfdi: PIN},
                           dcap_path="/sep2/dcap")
        finally:
            await client.close()
        return state

    state = asyncio.run(run())
    assert state.csip_aus_mode
    assert len(state.end_devices) == 1
    (edev,) = state.end_devices.values()
    assert edev.lfdi.hex().upper() == lfdi
    assert len(edev.fsa_list) == 1
    assert sorted(p.primacy for p in state.der_programs.values()) == [1, 5]
    doe = next(p for p in state.der_programs.values() if p.primacy == 1)
    assert len(doe.der_controls) == 2
    assert doe.default_dercontrol is not None


def test_head_and_expect_100_continue(pki, server):
    """HEAD is answered like GET without a body (it was 405 on every resource), and a
    client that sends "Expect: 100-continue" gets its 100 at once (curl waited ~1 s per
    POST for it)."""
    dev = Client(server["port"], _ctx(pki, "agg1"))
    dev.conn.request("HEAD", "/sep2/dcap")
    resp = dev.conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    assert int(resp.getheader("content-length")) > 0
    assert dev.get("/sep2/dcap") is not None          # the connection is still in step
    d1 = Client(server["port"], _ctx(pki, "dev1"))    # a registered device
    edevs = d1.get(d1.get("/sep2/dcap").find(f"{Q}EndDeviceListLink").get("href"))
    assert edevs.get("subscribable") == "1"           # the list is subscribable ...
    assert edevs.findall(f"{Q}EndDevice")
    for ed in edevs.findall(f"{Q}EndDevice"):          # ... an EndDevice is not (it said
        assert ed.get("subscribable") in (None, "0")   # 1 and subscriptions got 400)
    body = (f'<EndDevice xmlns="urn:ieee:std:2030.5:ns"><lFDI>{"78" * 20}</lFDI>'
            f'<sFDI>{_sfdi("78" * 20)}</sFDI><changedTime>0</changedTime></EndDevice>').encode()
    ctx = _ctx(pki, "agg1")
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"POST /sep2/edev HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: application/sep+xml\r\nExpect: 100-continue\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode())
            tls.settimeout(0.5)
            first = tls.recv(4096)                    # before any body byte is sent
            assert first.startswith(b"HTTP/1.1 100"), first
            tls.settimeout(5)
            tls.sendall(body)
            rest = tls.recv(4096)
            assert rest.split(b"\r\n", 1)[0].split()[1] in (b"201", b"204"), rest
