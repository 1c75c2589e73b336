"""IEEE 2030.5 metering mirror: MirrorUsagePoints and MirrorMeterReadings POSTed by clients
become readings in the derms historian — exactly once, validated first, only for the
client's own devices.

In process: :class:`SepApp` with a :class:`StoreReadingSink` on SQLite (the awaitable it
returns for writes is awaited here as the listener does). Acceptance: ``derms serve`` as a
subprocess; py20305's client (PyPI) builds its MirrorUsagePoint and readings with its own
telemetry builders and POSTs them over mutual TLS."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from typer.testing import CliRunner

from derms.cli.main import app as cli
from derms.protocols.ieee2030_5 import InMemoryRepository, SepApp, SepSettings
from derms.protocols.ieee2030_5.http11 import Request
from derms.protocols.ieee2030_5.identity import ClientIdentity, sfdi_from_lfdi
from derms.protocols.ieee2030_5.mirror_map import target
from derms.protocols.ieee2030_5.model import MirrorUsagePointRecord, ReadingTypeRecord
from derms.protocols.ieee2030_5.sep_xml import NS, validation_errors
from derms.protocols.ieee2030_5.telemetry import SOURCE, StoreReadingSink
from derms.store.db import make_engine, make_session_factory
from derms.store.migrate import upgrade
from derms.store.models import DerDevice, DerSite, DerType, Meter
from derms.store.timeseries import Quality, read_readings
from tests.integration.conftest import mint_token
from tests.integration.test_ieee2030_5_management import _discover, _Served

Q = f"{{{NS}}}"
LFDI_1, LFDI_2, LFDI_AGG = "A1" * 20, "B2" * 20, "C3" * 20
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EPOCH = int(T0.timestamp())


def _add_store_devices(url: str, ders: list[str], meters: list[str]) -> None:
    engine = make_engine(url)
    with make_session_factory(engine).begin() as s:
        s.add(DerSite(site_id="site"))
        s.flush()
        for d in ders:
            s.add(DerDevice(der_id=d, site_id="site", der_type=DerType.BATTERY, s_max_kva=5.0,
                            p_gen_max_kw=5.0, p_charge_max_kw=5.0, e_max_kwh=13.5))
        for m in meters:
            s.add(Meter(meter_id=m, site_id="site"))
    engine.dispose()


def _readings(engine, quantity: str, **owner):
    return read_readings(engine, quantity=quantity, start=T0 - timedelta(days=400),
                         end=T0 + timedelta(days=400), source=SOURCE, **owner)


@pytest.fixture()
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    upgrade(url)
    _add_store_devices(url, ["inv-1", "inv-2"], ["NMI-1"])
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture()
def app(store):
    repo = InMemoryRepository()
    repo.add_end_device(LFDI_1, der_id="inv-1", nmi="NMI-1")
    repo.add_end_device(LFDI_2, der_id="inv-2")
    repo.add_end_device("D4" * 20, owner_lfdi=LFDI_AGG)  # aggregated, no store mapping
    return SepApp(repo, SepSettings(), telemetry=StoreReadingSink(store))


def _call(app: SepApp, lfdi: str, method: str, path: str, body: bytes = b"",
          content_type: str = "application/sep+xml"):
    ident = ClientIdentity(lfdi=lfdi, sfdi=sfdi_from_lfdi(lfdi), cert_der=b"")
    resp = app(Request(method, path, {"l": "10"}, {"content-type": content_type}, body, ident))
    return asyncio.run(resp) if asyncio.iscoroutine(resp) else resp


def _rt(uom: int, mult: int = 0, flow: int = 1, phase: int | None = None) -> str:
    phase_el = f"<phase>{phase}</phase>" if phase is not None else ""
    return (f"<ReadingType><accumulationBehaviour>12</accumulationBehaviour>"
            f"<commodity>1</commodity><dataQualifier>12</dataQualifier>"
            f"<flowDirection>{flow}</flowDirection><kind>37</kind>{phase_el}"
            f"<powerOfTenMultiplier>{mult}</powerOfTenMultiplier><uom>{uom}</uom>"
            f"</ReadingType>")


def _mrid(k: int) -> str:
    return f"{k:032X}"


def _mup(lfdi: str, mrid: int = 1, role: str = "0049", readings: str = "") -> bytes:
    return (f'<MirrorUsagePoint xmlns="urn:ieee:std:2030.5:ns"><mRID>{_mrid(mrid)}</mRID>'
            f"<description>inverter</description><roleFlags>{role}</roleFlags>"
            f"<serviceCategoryKind>0</serviceCategoryKind><status>1</status>"
            f"<deviceLFDI>{lfdi}</deviceLFDI>{readings}<postRate>60</postRate>"
            f"</MirrorUsagePoint>").encode()


def _mmr(k: int, reading_type: str = "", value: int | None = None, t: int = EPOCH,
         quality: str | None = None) -> str:
    reading = ""
    if value is not None:
        q = f"<qualityFlags>{quality}</qualityFlags>" if quality else ""
        reading = (f"<Reading>{q}<timePeriod><duration>0</duration><start>{t}</start>"
                   f"</timePeriod><value>{value}</value></Reading>")
    return (f"<MirrorMeterReading><mRID>{_mrid(k)}</mRID><description>r{k}</description>"
            f"{reading}{reading_type}</MirrorMeterReading>")


def _list(*mmrs: str) -> bytes:
    return (f'<MirrorMeterReadingList xmlns="urn:ieee:std:2030.5:ns" all="{len(mmrs)}" '
            f'results="{len(mmrs)}">{"".join(mmrs)}</MirrorMeterReadingList>').encode()


def _create(app, lfdi=LFDI_1, **kw) -> str:
    resp = _call(app, lfdi, "POST", "/mup", _mup(lfdi, **kw))
    assert resp.status == 201, resp
    return dict(resp.headers)["location"]


DER_TYPES = (_mmr(10, _rt(38, 0, 1)) + _mmr(11, _rt(63, 0, 19)) + _mmr(12, _rt(29, -1, 0))
             + _mmr(13, _rt(72, 0, 1)) + _mmr(14, _rt(38, 1, 1, phase=129))
             + _mmr(15, _rt(65, -3, 1)))


def test_readings_are_stored_once_with_units_and_signs(app, store):
    href = _create(app, readings=DER_TYPES)
    assert href == "/mup/1"
    # the client POSTs its readings; and again (a retry): stored once
    body = _list(_mmr(10, value=3000), _mmr(11, value=200), _mmr(12, value=2405),
                 _mmr(13, value=12_345), _mmr(14, value=250, quality="0004"),
                 _mmr(15, value=980))
    for _ in range(2):
        assert _call(app, LFDI_1, "POST", href, body).status == 201
    p = _readings(store, "p_kw", der_id="inv-1")
    assert list(p.value) == [-3.0] and list(p.t) == [T0]  # a DER's forward = its output
    assert list(_readings(store, "q_kvar", der_id="inv-1").value) == [0.2]  # reverse: absorbs
    assert list(_readings(store, "v_v", der_id="inv-1").value) == [pytest.approx(240.5)]
    assert list(_readings(store, "e_exp_kwh", der_id="inv-1").value) == [12.345]
    phase_a = _readings(store, "p_a_kw", der_id="inv-1")
    assert list(phase_a.value) == [-2.5] and list(phase_a.quality) == [Quality.ESTIMATED]
    # power factor is not stored; nothing else appeared
    from sqlalchemy import text
    with store.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM readings")).scalar() == 5
    # a later reading of the same type is a new row (a negative forward value: the DER
    # absorbs, i.e. imports)
    assert _call(app, LFDI_1, "POST", href, _list(_mmr(10, value=-1500, t=EPOCH + 60))).status \
        == 201
    assert list(_readings(store, "p_kw", der_id="inv-1").value) == [-3.0, 1.5]
    # the MUP and its list as the client reads them back: schema-valid, its own only
    mup = _call(app, LFDI_1, "GET", href)
    assert mup.status == 200 and validation_errors(mup.body) == []
    mups = _call(app, LFDI_1, "GET", "/mup")
    assert validation_errors(mups.body) == [] and b'all="1"' in mups.body
    assert b'all="0"' in _call(app, LFDI_2, "GET", "/mup").body
    dcap = _call(app, LFDI_1, "GET", "/dcap").body
    assert b'<MirrorUsagePointListLink href="/mup" all="1"/>' in dcap


def test_site_meter_readings_go_to_the_connection_points_meter(app, store):
    href = _create(app, mrid=2, role="0003", readings=_mmr(20, _rt(38, 0, 1))
                   + _mmr(21, _rt(38, 0, 19)) + _mmr(22, _rt(72, 0, 19)))
    assert _call(app, LFDI_1, "POST", href, _list(
        _mmr(20, value=2000), _mmr(21, value=700, t=EPOCH + 1),
        _mmr(22, value=1000))).status == 201
    p = _readings(store, "p_kw", meter_id="NMI-1")  # import positive at the site
    assert list(p.value) == [2.0, -0.7]
    assert list(_readings(store, "e_exp_kwh", meter_id="NMI-1").value) == [1.0]
    assert _readings(store, "p_kw", der_id="inv-1").empty


def test_forward_and_reverse_power_at_one_time_are_stored_as_the_net(app, store):
    """A site posting its import and export W registers for the same moment: both map to
    p_kw and the historian keeps the first, so 0 W import / 2 kW export was stored as 0;
    a post's power readings of one time are now summed (-2 kW)."""
    href = _create(app, mrid=3, role="0003", readings=_mmr(30, _rt(38, 0, 1))
                   + _mmr(31, _rt(38, 0, 19)))
    assert _call(app, LFDI_1, "POST", href, _list(_mmr(30, value=0), _mmr(31, value=2000))
                 ).status == 201
    assert list(_readings(store, "p_kw", meter_id="NMI-1").value) == [-2.0]
    # average and maximum readings of one time are no pair: not summed (the first is kept)
    href2 = _create(app, mrid=4, role="0003", readings=_mmr(40, _rt(38, 0, 1))
                    + _mmr(41, _rt(38, 0, 1)))
    assert _call(app, LFDI_1, "POST", href2, _list(_mmr(40, value=3000, t=EPOCH + 60),
                                                   _mmr(41, value=4000, t=EPOCH + 60))
                 ).status == 201
    assert list(_readings(store, "p_kw", meter_id="NMI-1").value) == [-2.0, 3.0]


def test_bad_documents_are_refused_and_nothing_is_stored(app, store):
    from sqlalchemy import text

    def stored() -> int:
        with store.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM readings")).scalar()

    good = _mup(LFDI_1, readings=_mmr(10, _rt(38), value=5))
    for body in (b"<MirrorUsagePoint", good.replace(b"<status>1</status>", b""),
                 good.replace(b"<uom>38</uom>", b"<uom>x</uom>"),
                 good.replace(b"MirrorUsagePoint", b"MirrorUsagePointList"),
                 _mup(LFDI_1, readings=_mmr(10, value=5)),  # no ReadingType
                 # an empty mRID (schema-valid hexBinary, but no identity): an independent
                 # sweep got 201 for the usage point
                 re.sub(rb"<mRID>[0-9A-F]+</mRID>", b"<mRID></mRID>", good, count=1),
                 re.sub(rb"(<MirrorMeterReading><mRID>)[0-9A-F]+", rb"\1", good)):
        assert _call(app, LFDI_1, "POST", "/mup", body).status == 400, body
    assert _call(app, LFDI_1, "POST", "/mup", good, "application/xml").status == 415
    assert app.repo.mirror_usage_points() == [] and stored() == 0
    href = _create(app, readings=_mmr(10, _rt(38)))
    for body in (_list(_mmr(10, value=5)).replace(b"<value>5</value>", b"<value>x</value>"),
                 _list(_mmr(10, value=5), _mmr(99, value=1)),  # unregistered reading
                 _list(_mmr(10, _rt(29), value=5)),  # its ReadingType changed
                 _list(_mmr(10, value=5, t=10**15)),  # a time beyond the calendar
                 re.sub(rb"(<MirrorMeterReading><mRID>)[0-9A-F]+", rb"\1",
                        _list(_mmr(10, value=5)))):
        assert _call(app, LFDI_1, "POST", href, body).status == 400, body
    assert stored() == 0
    # a device whose DER has no store mapping: its readings are refused, not dropped
    agg = _call(app, LFDI_AGG, "POST", "/mup", _mup("D4" * 20, mrid=7,
                                                    readings=_mmr(70, _rt(38), value=1)))
    assert agg.status == 400 and stored() == 0


def test_another_clients_mirror_is_out_of_reach(app, store):
    href = _create(app, readings=_mmr(10, _rt(38)))
    assert _call(app, LFDI_2, "GET", href).status == 404
    assert _call(app, LFDI_2, "POST", href, _list(_mmr(10, value=9))).status == 404
    # a MUP for another device, or re-using another client's MUP mRID
    assert _call(app, LFDI_2, "POST", "/mup", _mup(LFDI_1, mrid=5)).status == 403
    assert _call(app, LFDI_2, "POST", "/mup", _mup(LFDI_2, mrid=1)).status == 403
    assert _call(app, LFDI_1, "POST", "/mup/77", _list(_mmr(10, value=9))).status == 404
    assert _readings(store, "p_kw", der_id="inv-1").empty
    assert _readings(store, "p_kw", der_id="inv-2").empty
    # the same client re-POSTing its MUP gets the same one back, with a reading added
    again = _call(app, LFDI_1, "POST", "/mup", _mup(LFDI_1, readings=_mmr(11, _rt(63))))
    assert (again.status, dict(again.headers)["location"]) == (201, href)
    assert len(app.repo.mirror_usage_point(1).readings) == 2


def test_der_status_state_of_charge_becomes_a_reading(app, store):
    body = (f'<DERStatus xmlns="urn:ieee:std:2030.5:ns"><readingTime>{EPOCH}</readingTime>'
            f"<stateOfChargeStatus><dateTime>{EPOCH}</dateTime><value>5025</value>"
            f"</stateOfChargeStatus></DERStatus>").encode()
    for _ in range(2):
        assert _call(app, LFDI_1, "PUT", "/edev/1/der/1/ders", body).status == 204
    soc = _readings(store, "soc_frac", der_id="inv-1")
    assert list(soc.value) == [0.5025] and list(soc.t) == [T0]


@pytest.mark.parametrize(("flags", "flow", "expect"), [
    (0x49, 1, ("p_kw", -1.0)), (0x49, 19, ("p_kw", 1.0)), (0x49, 0, ("p_kw", 1.0)),
    (0x03, 1, ("p_kw", 1.0)), (0x03, 19, ("p_kw", -1.0)), (0x03, 4, ("p_kw", 1.0)),
    (0x41, 1, ("p_kw", 1.0)),  # a submeter of a load: forward = consumption
])
def test_power_sign_by_role_and_flow_direction(flags, flow, expect):
    mup = MirrorUsagePointRecord(1, "0" * 32, 1, "A" * 40, "A" * 40, flags, 0, 1)
    tgt = target(ReadingTypeRecord(uom=38, power_of_ten_multiplier=3, flow_direction=flow),
                 mup)
    assert (tgt.quantity, tgt.value(2)) == (expect[0], expect[1] * 2)
    assert target(ReadingTypeRecord(uom=38, phase=132), mup) is None  # line-to-line
    assert target(ReadingTypeRecord(uom=65), mup) is None  # power factor


# ----------------------------------------------------------------------------- acceptance


def test_acceptance_py20305_mirrors_readings_into_the_historian(tmp_path):
    """derms serve + py20305's client: discovery finds the MirrorUsagePointList, the client
    POSTs the MUPs its telemetry module builds (DER and site meter) and their readings twice;
    each reading is in the store once, under the DER device and the site's meter."""
    from py20305.telemetry.mup import DeviceRole, create_meter_reading_list, create_mup
    from py20305.xml import to_xml

    pki = tmp_path / "pki"
    result = CliRunner().invoke(cli, ["certs", str(pki), "--device", "site1", "--device",
                                      "site2"])
    assert result.exit_code == 0, result.output
    with (pki / "identities.csv").open() as fh:
        ids = {r["name"]: r for r in csv.DictReader(fh)}
    url = f"sqlite:///{tmp_path / 'derms.db'}"
    upgrade(url)
    _add_store_devices(url, ["inv-1"], ["4103000001"])
    env = {**os.environ, "DERMS_DATABASE_URL": url, "DERMS_DATA_DIR": str(tmp_path)}
    served = _Served(env, pki)
    t_read = int(time.time()) // 60 * 60
    data = {"W": 4200, "Var": -300, "V": 241.2, "Hz": 50.0, "PF": 0.99, "VA": 4211, "A": 17.5}
    site = {"W": -3500, "Var": 100}
    try:
        served.wait_ready()
        admin = mint_token(url, "admin")
        api = f"http://127.0.0.1:{served.port}/v1/ieee2030-5"
        with httpx.Client(timeout=10) as h:
            r = h.post(f"{api}/end-devices", headers=admin, json={
                "lfdi": ids["site1"]["lfdi"], "pin": 111115, "connection_point": "4103000001",
                "der_id": "inv-1"})
            assert r.status_code == 201, r.text
            bad = h.post(f"{api}/end-devices", headers=admin, json={
                "lfdi": ids["site2"]["lfdi"], "der_id": "no-such-der"})
            assert bad.status_code == 422, bad.text
            assert h.post(f"{api}/end-devices", headers=admin, json={
                "lfdi": ids["site2"]["lfdi"], "pin": 222220}).status_code == 201

        lfdi = ids["site1"]["lfdi"].lower()

        async def mirror(client, state):
            out = {"mup_list": state.mup_list_href}
            der = to_xml(create_mup(lfdi, data, 60), server_2018_compat=True)
            meter_lfdi = "ee" * 20  # the site meter's own identity, mirrored under site1
            meter = to_xml(create_mup(meter_lfdi, site, 60, role=DeviceRole.SITE_METER,
                                      device_lfdi=lfdi), server_2018_compat=True)
            out["der"] = await client.post_bytes(state.mup_list_href, der)
            out["meter"] = await client.post_bytes(state.mup_list_href, meter)
            for _ in range(2):  # a retry stores nothing twice
                await client.post_bytes(out["der"], to_xml(create_meter_reading_list(
                    lfdi, data, timestamp=t_read), server_2018_compat=True))
                await client.post_bytes(out["meter"], to_xml(create_meter_reading_list(
                    meter_lfdi, site, timestamp=t_read, role=DeviceRole.SITE_METER),
                    server_2018_compat=True))
            return out

        state, out = _discover(pki, "site1", ids["site1"]["lfdi"], served.sep_port, 111115,
                               after=mirror)
        assert out["mup_list"] == "/sep2/mup"
        assert out["der"].startswith("/sep2/mup/") and out["meter"] != out["der"]

        # site2's client cannot reach site1's mirror
        async def intrude(client, _state):
            from py20305.client.errors import Sep2ProtocolError

            with pytest.raises(Sep2ProtocolError) as err:
                await client.post_bytes(out["der"], to_xml(create_meter_reading_list(
                    lfdi, {"W": 1}, timestamp=t_read + 60), server_2018_compat=True))
            return err.value.status_code

        _, status = _discover(pki, "site2", ids["site2"]["lfdi"], served.sep_port, 222220,
                              after=intrude)
        assert status == 404
    finally:
        served.stop()
    engine = make_engine(url)
    try:
        t = datetime.fromtimestamp(t_read, UTC)
        window = {"start": t - timedelta(hours=1), "end": t + timedelta(hours=1),
                  "source": SOURCE}
        p = read_readings(engine, quantity="p_kw", der_id="inv-1", **window)
        assert list(p.value) == [-4.2] and list(p.t) == [t]
        assert list(read_readings(engine, quantity="q_kvar", der_id="inv-1",
                                  **window).value) == [0.3]
        assert list(read_readings(engine, quantity="v_v", der_id="inv-1",
                                  **window).value) == [pytest.approx(241.2)]
        site_p = read_readings(engine, quantity="p_kw", meter_id="4103000001", **window)
        assert list(site_p.value) == [-3.5]  # the site exports 3.5 kW
        from sqlalchemy import text
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM readings")).scalar()
        assert n == 6 + 2  # DER: W, var, Hz, V, VA, A (no PF); site: W, var
    finally:
        engine.dispose()


def test_cached_control_list_follows_changes_and_the_clock():
    """DERControlLists are cached per device and page (the load test's hot path): a new or
    cancelled control, and the clock passing an event's start or end, show at once."""
    from derms.protocols.ieee2030_5.model import DerLimits

    now = [T0]
    repo = InMemoryRepository()
    prog = repo.add_program("DOE", 1)
    fsa = repo.add_fsa("all", [prog.program_id])
    dev = repo.add_end_device(LFDI_1, nmi="NMI-1", fsa_ids=[fsa.fsa_id]).edev_id
    repo.add_end_device(LFDI_2, nmi="NMI-2", fsa_ids=[fsa.fsa_id])
    first = repo.add_control(prog.program_id, T0 + timedelta(seconds=60), 60,
                             DerLimits(exp_lim_w=1), connection_point="NMI-1")
    app = SepApp(repo, SepSettings(), clock=lambda: now[0])
    path = f"/edev/{dev}/derp/{prog.program_id}/derc"

    def statuses() -> list[str]:
        from lxml import etree

        resp = _call(app, LFDI_1, "GET", path)
        assert resp.status == 200 and validation_errors(resp.body) == []
        return [c.findtext(f"{Q}EventStatus/{Q}currentStatus")
                for c in etree.fromstring(resp.body).findall(f"{Q}DERControl")]

    assert statuses() == ["0"] and statuses() == ["0"]  # scheduled (second: from the cache)
    now[0] = T0 + timedelta(seconds=60)
    assert statuses() == ["1"]  # active from its start
    repo.add_control(prog.program_id, T0 + timedelta(seconds=120), 600,
                     DerLimits(exp_lim_w=2), connection_point="NMI-1")  # right after: no overlap
    repo.add_control(prog.program_id, T0, 6000, DerLimits(exp_lim_w=3),
                     connection_point="NMI-2")  # another site's: not listed
    assert statuses() == ["1", "0"]
    repo.cancel_control(first.control_id)
    assert statuses() == ["2", "0"]
    now[0] = T0 + timedelta(seconds=120)
    assert statuses() == ["1"]  # the first is over and leaves the list; the second runs
    now[0] = T0 + timedelta(seconds=120 + 600)
    assert statuses() == []
    assert _call(app, LFDI_2, "GET", path).status == 404  # access still checked per request
