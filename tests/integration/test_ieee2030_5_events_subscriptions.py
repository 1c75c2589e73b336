"""IEEE 2030.5 server: DER curves, supersession, LogEvents, Subscriptions and Notifications.

Notifications go to the ``py20305`` client's own NotificationServer (PyPI, Apache-2.0) over
mutual TLS, after its SubscriptionManager subscribed through our SubscriptionList.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
from lxml import etree

from derms.protocols.ieee2030_5 import (
    Ieee2030_5Config,
    InMemoryRepository,
    SepApp,
    SepSettings,
    start_ieee2030_5_server,
)
from derms.protocols.ieee2030_5.events import superseded_times
from derms.protocols.ieee2030_5.model import DerLimits
from derms.protocols.ieee2030_5.sep_xml import NS, validation_errors
from tests.integration.test_ieee2030_5_mirror import LFDI_1, LFDI_2, T0, _call
from tests.integration.test_ieee2030_5_server import Client, _ctx, pki  # noqa: F401

Q = f"{{{NS}}}"


def _app(now: list[datetime]) -> tuple[SepApp, InMemoryRepository, int, int]:
    repo = InMemoryRepository()
    prog = repo.add_program("DOE", 1)
    fsa = repo.add_fsa("all", [prog.program_id])
    dev = repo.add_end_device(LFDI_1, nmi="NMI-1", fsa_ids=[fsa.fsa_id]).edev_id
    repo.add_end_device(LFDI_2, nmi="NMI-2", fsa_ids=[fsa.fsa_id])
    return SepApp(repo, SepSettings(), clock=lambda: now[0]), repo, dev, prog.program_id


def _get(app, lfdi, path) -> etree._Element:
    resp = _call(app, lfdi, "GET", path)
    assert resp.status == 200, (path, resp.status)
    assert validation_errors(resp.body) == [], resp.body
    return etree.fromstring(resp.body)


def test_curves_are_served_and_linked_from_controls():
    now = [T0]
    app, repo, dev, prog = _app(now)
    vv = repo.add_curve(prog, 11, [92, 98, 102, 108], [44, 0, 0, -44], 2,
                        description="AS4777 volt-var", ramp_pt1_tms=500)
    vw = repo.add_curve(prog, 12, [106, 110], [100, 20], 1)
    repo.add_control(prog, T0, 600, DerLimits(exp_lim_w=1500, volt_var_curve_id=vv.curve_id,
                                              volt_watt_curve_id=vw.curve_id),
                     connection_point="NMI-1")
    program = _get(app, LFDI_1, f"/edev/{dev}/derp/{prog}")
    link = program.find(f"{Q}DERCurveListLink")
    assert link.get("all") == "2"
    curves = _get(app, LFDI_1, link.get("href"))
    first = curves.find(f"{Q}DERCurve")
    assert first.findtext(f"{Q}curveType") == "11"
    assert [p.findtext(f"{Q}xvalue") for p in first.findall(f"{Q}CurveData")] == [
        "9200", "9800", "10200", "10800"]  # × 10^-2 (%)
    assert first.findtext(f"{Q}xMultiplier") == "-2" and first.findtext(f"{Q}yRefType") == "2"
    control = _get(app, LFDI_1, f"/edev/{dev}/derp/{prog}/derc").find(f"{Q}DERControl")
    href = control.find(f"{Q}DERControlBase/{Q}opModVoltVar").get("href")
    assert _get(app, LFDI_1, href).findtext(f"{Q}mRID") == vv.mrid
    # bad curves and bad links are refused, naming the problem
    with pytest.raises(ValueError, match="increase"):
        repo.add_curve(prog, 11, [100, 90], [0, 0], 2)
    with pytest.raises(ValueError, match="1..10"):
        repo.add_curve(prog, 11, list(range(11)), [0] * 11, 2)
    with pytest.raises(ValueError, match="curveType 12, expected 11"):
        repo.add_control(prog, T0, 60, DerLimits(volt_var_curve_id=vw.curve_id))
    with pytest.raises(ValueError, match="not a curve"):
        repo.add_control(prog, T0, 60, DerLimits(freq_watt_curve_id=999))
    assert _call(app, LFDI_1, "GET", f"/edev/{dev}/derp/{prog}/dc/999").status == 404


def test_newer_overlapping_event_supersedes_the_older():
    now = [T0]
    app, repo, dev, prog = _app(now)
    old = repo.add_control(prog, T0 + timedelta(minutes=5), 600, DerLimits(exp_lim_w=1),
                           connection_point="NMI-1")
    path = f"/edev/{dev}/derp/{prog}/derc"

    def statuses():
        return [c.findtext(f"{Q}EventStatus/{Q}currentStatus")
                for c in _get(app, LFDI_1, path).findall(f"{Q}DERControl")]

    assert statuses() == ["0"]
    newer = repo.add_control(prog, T0 + timedelta(minutes=10), 600, DerLimits(exp_lim_w=2),
                             connection_point="NMI-1")
    # the same second: the server id orders them; the newer overlapping one wins
    assert superseded_times([old, newer]) == {old.control_id: newer.creation_time}
    assert statuses() == ["4", "0"]
    # another device's event does not supersede this device's; a cancelled one supersedes nothing
    repo.add_control(prog, T0, 6000, DerLimits(exp_lim_w=3), connection_point="NMI-2")
    repo.cancel_control(newer.control_id)
    assert statuses() == ["0", "2"]
    now[0] = T0 + timedelta(minutes=6)  # the old one runs (not superseded any more)
    active = _get(app, LFDI_1, f"/edev/{dev}/derp/{prog}/actderc")
    assert active.get("all") == "1"
    # adjacent events do not overlap
    a = repo.add_control(prog, T0 + timedelta(hours=1), 300, DerLimits(exp_lim_w=4),
                         connection_point="NMI-1")
    b = repo.add_control(prog, T0 + timedelta(hours=1, minutes=5), 300, DerLimits(exp_lim_w=5),
                         connection_point="NMI-1")
    assert superseded_times([a, b]) == {}


def test_log_events_are_stored_and_listed_newest_first():
    now = [T0]
    app, repo, dev, _ = _app(now)
    path = f"/edev/{dev}/lel"

    def body(t: int, code: int, details: str = "") -> bytes:
        extra = f"<details>{details}</details>" if details else ""
        return (f'<LogEvent xmlns="{NS}"><createdDateTime>{t}</createdDateTime>{extra}'
                f"<functionSet>14</functionSet><logEventCode>{code}</logEventCode>"
                "<logEventID>7</logEventID><logEventPEN>40732</logEventPEN>"
                "<profileID>2</profileID></LogEvent>").encode()

    epoch = int(T0.timestamp())
    first = _call(app, LFDI_1, "POST", path, body(epoch, 3, "over-voltage trip"))
    assert first.status == 201
    assert _call(app, LFDI_1, "POST", path, body(epoch + 60, 4)).status == 201
    listed = _get(app, LFDI_1, path)
    assert listed.get("all") == "2"
    assert [e.findtext(f"{Q}logEventCode") for e in listed] == ["4", "3"]
    loc = dict(first.headers)["location"]
    assert _get(app, LFDI_1, loc).findtext(f"{Q}details") == "over-voltage trip"
    # bad input: schema-invalid, wrong media type, another device's list; nothing stored
    assert _call(app, LFDI_1, "POST", path, b"<LogEvent xmlns='urn:ieee:std:2030.5:ns'/>"
                 ).status == 400
    assert _call(app, LFDI_1, "POST", path, body(epoch, 1), content_type="text/xml"
                 ).status == 415
    assert _call(app, LFDI_2, "POST", path, body(epoch, 1)).status == 404
    assert len(repo.log_events(dev)) == 2


def _sub_body(resource: str, uri: str, *, encoding: int = 0, condition: bool = False) -> bytes:
    cond = ("<Condition><attributeIdentifier>0</attributeIdentifier><lowerThreshold>0"
            "</lowerThreshold><upperThreshold>1</upperThreshold></Condition>") if condition else ""
    return (f'<Subscription xmlns="{NS}"><subscribedResource>{resource}</subscribedResource>'
            f"{cond}<encoding>{encoding}</encoding><level>+S1</level><limit>10</limit>"
            f"<notificationURI>{uri}</notificationURI></Subscription>").encode()


def test_subscription_rules():
    now = [T0]
    app, repo, dev, prog = _app(now)
    path = f"/edev/{dev}/sub"
    derc = f"/edev/{dev}/derp/{prog}/derc"
    uri = "https://127.0.0.1:9/notify"
    created = _call(app, LFDI_1, "POST", path, _sub_body(derc, uri))
    assert created.status == 201
    loc = dict(created.headers)["location"]
    assert _get(app, LFDI_1, loc).findtext(f"{Q}subscribedResource") == derc
    again = _call(app, LFDI_1, "POST", path, _sub_body(derc, uri))  # a renewal, not a copy
    assert dict(again.headers)["location"] == loc and len(repo.subscriptions(dev)) == 1
    assert _get(app, LFDI_1, path).get("all") == "1"
    for body, reason in [
        (_sub_body(derc, uri, encoding=1), "1"),  # EXI
        (_sub_body(derc, "http://127.0.0.1:9/n"), "1"),  # not https
        (_sub_body(f"/edev/{dev}/derp/{prog}/derc/1", uri), "1"),  # not subscribable
        (_sub_body(f"/edev/{dev + 1}/fsa", uri), "1"),  # another device's
        (_sub_body(derc, uri, condition=True), "3"),
    ]:
        resp = _call(app, LFDI_1, "POST", path, body)
        assert resp.status == 400, body
        assert etree.fromstring(resp.body).findtext(f"{Q}reasonCode") == reason
    assert _call(app, LFDI_2, "POST", path, _sub_body(derc, uri)).status == 404
    assert _call(app, LFDI_2, "DELETE", loc).status == 404
    assert _call(app, LFDI_1, "DELETE", loc).status == 204
    assert _call(app, LFDI_1, "GET", loc).status == 404 and repo.subscriptions() == []
    assert _call(app, LFDI_1, "PUT", path, b"").status == 405


def test_notification_hosts_can_be_restricted():
    """A device's subscription made the server send notifications to any host it named (a
    sweep's went out of the sandbox); ``notify_hosts`` restricts it to names and networks."""
    app, _repo, dev, prog = _app([T0])
    app.settings = SepSettings(notify_hosts=("127.0.0.0/8", ".grid.example"))
    path = f"/edev/{dev}/sub"
    derc = f"/edev/{dev}/derp/{prog}/derc"
    for uri, status in (("https://127.0.0.1:9/n", 201), ("https://hes.grid.example/n", 201),
                        ("https://10.255.255.1:443/n", 400), ("https://evil.example/n", 400),
                        ("https://grid.example.evil.net/n", 400)):
        resp = _call(app, LFDI_1, "POST", path, _sub_body(derc, uri))
        assert resp.status == status, (uri, resp.status, resp.body)
    assert SepSettings().notify_host_allowed("anything.example")  # default: any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_py20305_client_subscribes_and_gets_notified(pki):  # noqa: F811
    """The independent client subscribes to its DERControlList and DefaultDERControl; a new
    control, a cancellation and a new default control each reach its NotificationServer over
    mutual TLS; a receiver holding another device's certificate gets nothing."""
    from py20305.client.http import Sep2Client
    from py20305.client.tls import TlsConfig
    from py20305.subscription.manager import SubscriptionManager
    from py20305.subscription.notification_server import NotificationServer

    d, ids = pki["dir"], pki["ids"]
    repo = InMemoryRepository()
    prog = repo.add_program("DOE", 1)
    fsa = repo.add_fsa("all", [prog.program_id])
    dev = repo.add_end_device(ids["dev1"]["lfdi"], nmi="NMI-9", fsa_ids=[fsa.fsa_id]).edev_id
    dev2 = repo.add_end_device(ids["dev2"]["lfdi"], fsa_ids=[fsa.fsa_id]).edev_id
    repo.set_default_control(prog.program_id, DerLimits(exp_lim_w=1500))
    running = start_ieee2030_5_server(
        Ieee2030_5Config(d / "server.pem", d / "server.key", d / "ca.pem", port=0,
                         notify_period_s=0.1), repo)
    base = f"/edev/{dev}/derp/{prog.program_id}"
    received: list = []

    async def scenario():
        tls = TlsConfig(client_cert=d / "dev1.pem", client_key=d / "dev1.key",
                        ca_cert=d / "ca.pem")
        client = Sep2Client(f"https://localhost:{running.port}", tls=tls)
        port = _free_port()
        got = asyncio.Event()

        async def on_notification(n):
            received.append(n)
            got.set()

        listener = NotificationServer(host="127.0.0.1", port=port, tls=tls,
                                      on_notification=on_notification,
                                      client_cert_mode="enforce")
        await listener.start()
        mgr = SubscriptionManager(client, f"https://127.0.0.1:{port}/notify")
        try:
            sub = await mgr.subscribe(f"/edev/{dev}/sub", f"{base}/derc", "DERControlList",
                                      limit=10)
            assert sub is not None and sub.subscription_uri.startswith(f"/edev/{dev}/sub/")
            assert await mgr.subscribe(f"/edev/{dev}/sub", f"{base}/dderc",
                                       "DefaultDERControl") is not None

            async def wait(n: int):
                t0 = time.monotonic()
                while len(received) < n and time.monotonic() - t0 < 10:
                    got.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(got.wait(), 1)
                return len(received) >= n

            assert await wait(2)  # the current state of both, once
            start = datetime.now(UTC) + timedelta(minutes=5)
            control = repo.add_control(prog.program_id, start, 300, DerLimits(exp_lim_w=700),
                                       connection_point="NMI-9")
            assert await wait(3)
            repo.add_control(prog.program_id, start, 300, DerLimits(exp_lim_w=1),
                             edev_id=dev2)  # dev2's: dev1's list is unchanged
            repo.cancel_control(control.control_id)
            assert await wait(4)
            repo.set_default_control(prog.program_id, DerLimits(exp_lim_w=900))
            assert await wait(5)
            await asyncio.sleep(0.5)
            assert len(received) == 5  # nothing for dev2's control
            assert await mgr.cancel(sub.subscription_uri)
        finally:
            await listener.stop()
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        running.stop()
    hrefs = [str(n.subscribed_resource) for n in received]
    assert hrefs.count(f"{base}/derc") == 3 and hrefs.count(f"{base}/dderc") == 2
    assert len(repo.subscriptions(dev)) == 1  # the DERControlList one was cancelled


def test_notification_needs_the_subscribers_certificate(pki):  # noqa: F811
    """A notificationURI served with another device's certificate gets nothing (retried)."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from derms.protocols.ieee2030_5.notify import SepNotifier, notify_ssl_context

    d, ids = pki["dir"], pki["ids"]
    hits: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "dev2.pem", d / "dev2.key")  # not dev1's certificate
    ctx.load_verify_locations(d / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        repo = InMemoryRepository()
        prog = repo.add_program("DOE", 1)
        fsa = repo.add_fsa("all", [prog.program_id])
        dev = repo.add_end_device(ids["dev1"]["lfdi"], fsa_ids=[fsa.fsa_id]).edev_id
        app = SepApp(repo)
        uri = f"https://127.0.0.1:{httpd.server_address[1]}/n"
        assert _call(app, ids["dev1"]["lfdi"], "POST", f"/edev/{dev}/sub",
                     _sub_body(f"/edev/{dev}/fsa", uri)).status == 201
        notifier = SepNotifier(app, notify_ssl_context(d / "server.pem", d / "server.key",
                                                       d / "ca.pem"), retry_s=0)
        assert notifier.run_once() == 0 and hits == []
        (state,) = notifier.status().values()
        assert "not the subscriber's" in state.last_error and state.attempts == 1
        notifier.verify_subscriber = False  # the transport itself works
        assert notifier.run_once() == 1 and len(hits) == 1
        assert validation_errors(hits[0]) == []
        assert notifier.run_once() == 0  # unchanged: not sent again
        notifier.stop()
    finally:
        httpd.shutdown()


def test_notifier_renders_only_what_a_change_can_touch():
    """One device's new control re-renders that device's DERControlList subscription only
    (changes_since); a new default control only the DefaultDERControl ones; an unkeyed
    change (a new program) everything; a changed list is sent, an unchanged one not."""
    import ssl

    from derms.protocols.ieee2030_5.model import SubscriptionRecord
    from derms.protocols.ieee2030_5.notify import SepNotifier

    repo = InMemoryRepository()
    pid = repo.add_program("c", 0).program_id
    fsa = repo.add_fsa("f", [pid]).fsa_id
    repo.set_default_control(pid, DerLimits(exp_lim_w=1500))
    devs = []
    for k in range(20):
        lfdi = f"{k + 1:040X}"
        e = repo.add_end_device(lfdi, fsa_ids=[fsa], nmi=f"n{k}").edev_id
        devs.append(e)
        for href in (f"/edev/{e}/derp/{pid}/derc", f"/edev/{e}/derp/{pid}/dderc"):
            repo.add_subscription(SubscriptionRecord(0, e, lfdi, href, "https://h/n", 10))
    notifier = SepNotifier(SepApp(repo), ssl.create_default_context())
    rendered: list[str] = []
    sent: list[str] = []
    render = notifier._render

    def counting(sub):
        rendered.append(sub.subscribed_resource)
        return render(sub)

    notifier._render = counting
    notifier._deliver = lambda sub, body: (sent.append(sub.subscribed_resource), (201, None))[1]
    assert notifier.run_once() == 40 and len(rendered) == 40  # first pass: everything
    rendered.clear(), sent.clear()
    repo.add_control(pid, datetime.now(UTC) + timedelta(hours=1), 60, DerLimits(exp_lim_w=1),
                     connection_point="n3")
    assert notifier.run_once() == 1
    assert rendered == sent == [f"/edev/{devs[3]}/derp/{pid}/derc"]
    rendered.clear(), sent.clear()
    repo.set_default_control(pid, DerLimits(exp_lim_w=900))
    assert notifier.run_once() == 20 and all(r.endswith("/dderc") for r in rendered)
    rendered.clear(), sent.clear()
    repo.add_program("another", 5)  # unkeyed: everything is looked at, nothing changed
    assert notifier.run_once() == 0 and len(rendered) == 40 and sent == []
