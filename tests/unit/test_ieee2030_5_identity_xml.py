"""IEEE 2030.5 identity (LFDI/SFDI) against the standard's worked example, power scaling, and
every resource the mappers build validated against the IEEE 2030.5 + CSIP-AUS XSDs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from derms.protocols.ieee2030_5 import mappers as m
from derms.protocols.ieee2030_5 import sep_xml
from derms.protocols.ieee2030_5.identity import (
    lfdi_from_fingerprint,
    sfdi_check_digit,
    sfdi_from_lfdi,
    sfdi_is_valid,
)
from derms.protocols.ieee2030_5.model import DerLimits, LogEventRecord, SubscriptionRecord
from derms.protocols.ieee2030_5.repository import InMemoryRepository

# IEEE 2030.5-2018 §6.3.2–6.3.4 worked example
FINGERPRINT = "3E4F45AB31EDFE5B67E343E5E4562E31984E23E5349E2AD745672ED145EE213A"


def test_standard_worked_example():
    lfdi = lfdi_from_fingerprint(FINGERPRINT)
    assert lfdi == "3E4F45AB31EDFE5B67E343E5E4562E31984E23E5"
    assert int(lfdi[:9], 16) == 16726121139
    assert sfdi_from_lfdi(lfdi) == 167261211391
    assert sfdi_is_valid(167261211391) and not sfdi_is_valid(167261211397)


def test_check_digit_makes_digit_sum_a_multiple_of_ten():
    for n in (0, 1, 9, 16726121139, 68719476735):
        assert (sum(map(int, str(n))) + sfdi_check_digit(n)) % 10 == 0


@pytest.mark.parametrize("w, expected", [(5000, (5000, 0)), (0, (0, 0)), (32767, (32767, 0)),
                                         (32768, (3277, 1)), (123456, (12346, 1)),
                                         (-20000, (-20000, 0)), (5e6, (5000, 3))])
def test_active_power_scaling(w, expected):
    assert m.active_power(w) == expected
    value, mult = expected
    assert abs(m.w_from_active_power(value, mult) - w) <= 0.5 * 10**mult


@pytest.mark.parametrize("w, expected", [(123456, (12345, 1)), (32768, (3276, 1)),
                                         (0.4, (400, -3)), (5000, (5000, 0)), (0, (0, 0)),
                                         (-20000.7, (-20000, 0))])
def test_limits_never_go_out_looser_than_set(w, expected):
    """A limit rounded to nearest went out 4 W above 123,456 W, and 0.4 W went out as 0."""
    assert m.active_power(w, limit=True) == expected
    assert abs(m.w_from_active_power(*expected)) <= abs(w) + 1e-12


def test_active_power_out_of_range():
    with pytest.raises(ValueError):
        m.active_power(float("nan"))
    with pytest.raises(ValueError):
        m.active_power(1e15)


def _docs():
    repo = InMemoryRepository(pen=40732)
    p = repo.add_program("CSIP-AUS DOE", 1)
    f = repo.add_fsa("all sites", [p.program_id])
    e = repo.add_end_device("9BD4F6B6CB72A53F6237D59A537B8DD8DBF44963", pin=111115, nmi="4103000001",
                            fsa_ids=[f.fsa_id])
    now = datetime(2026, 1, 1, tzinfo=UTC)
    c = repo.add_control(p.program_id, now, 300,
                         DerLimits(exp_lim_w=123456, imp_lim_w=5000, gen_lim_w=4000,
                                   load_lim_w=3000, connect=True, energize=True),
                         randomize_start_s=30, randomize_duration_s=10, description="DOE")
    d = repo.set_default_control(p.program_id, DerLimits(exp_lim_w=1500, imp_lim_w=10000),
                                 set_grad_w=27)
    P = m.Paths("/api/v1")
    vv = repo.add_curve(p.program_id, 11, [92, 98, 102, 108], [44, 0, 0, -44], 2,
                        ramp_pt1_tms=500)
    fw = repo.add_curve(p.program_id, 0, [50.25, 52], [0, -100], 1)
    c2 = repo.add_control(p.program_id, now, 300,
                          DerLimits(target_w=-2500.0, volt_var_curve_id=vv.curve_id,
                                    freq_watt_curve_id=fw.curve_id, exp_lim_w=0))
    href = lambda i: P.curve(1, 1, i)
    log = LogEventRecord(1, 1, now, 14, 2, 9, 40732, 2, details="trip", extended_data=7)
    sub = SubscriptionRecord(1, 1, "AB" * 20, "/api/v1/edev/1/derp/1/derc",
                             "https://127.0.0.1:9/n", 10)
    lst = m.der_control_list("/c", [m.der_control("/c/2", c2, now, "/r", curve_href=href)], 1)
    extra = [m.der_control("/c/2", c2, now, "/r", superseded_time=now, curve_href=href),
             m.curve_list("/dc", [m.curve("/dc/1", vv), m.curve("/dc/2", fw)], 2),
             m.log_event_list("/lel", [m.log_event("/lel/1", log)], 1, 300),
             m.subscription_list("/sub", [m.subscription("/sub/1", sub)], 1),
             m.notification(sub, "/sub/1", lst), m.notification(sub, "/sub/1", None, 4),
             m.program(P, 1, p, n_controls=2, has_default=True, n_curves=2)]
    return extra + [m.device_capability(P, 1, 900), m.time_resource(P, now, 900),
            m.end_device_list(P, [e], 1, 300), m.end_device(P, e), m.registration(P, e),
            m.connection_point(P, e), m.fsa_list(P, 1, [f], 1, 300), m.fsa(P, 1, f),
            m.program_list("/l", [m.program(P, 1, p, n_controls=1, has_default=True)], 1, 300),
            m.der_control_list("/c", [m.der_control("/c/1", c, now)], 1),
            m.der_control("/c/1", c, now + timedelta(hours=1)),
            m.default_der_control("/d", d), m.end_device_list(P, [], 0, 300)]


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: d.tag.split("}")[1])
def test_every_mapped_resource_validates(doc):
    body = sep_xml.to_bytes(doc)
    assert sep_xml.validation_errors(body) == []
    assert doc.tag.split("}")[0][1:] in ("urn:ieee:std:2030.5:ns", "https://csipaus.org/ns")


def test_limits_round_trip_through_xml():
    limits = DerLimits(exp_lim_w=123460, imp_lim_w=5000, gen_lim_w=None, load_lim_w=3000,
                       connect=True, target_w=-7000.0)
    el = m.der_control_base(limits)
    parsed = sep_xml.parse(sep_xml.to_bytes(m.default_der_control("/d", _default(limits))),
                           "DefaultDERControl")
    base = parsed.find(f"{{{sep_xml.NS}}}DERControlBase")
    assert m.limits_from_control_base(base) == limits
    assert m.limits_from_control_base(el) == limits


def _default(limits):
    repo = InMemoryRepository()
    p = repo.add_program("p", 0)
    return repo.set_default_control(p.program_id, limits)


def test_schema_rejects_wrong_order_and_foreign_root():
    bad = (b'<DERControlBase xmlns="urn:ieee:std:2030.5:ns">'
           b'<opModEnergize>true</opModEnergize><opModConnect>true</opModConnect>'
           b'</DERControlBase>')
    assert sep_xml.validation_errors(bad)
    with pytest.raises(sep_xml.SepDocumentError):
        sep_xml.parse(b'<EndDevice xmlns="urn:example"/>', "EndDevice")
    with pytest.raises(sep_xml.SepDocumentError):
        sep_xml.parse(b'<!DOCTYPE x [<!ENTITY a "b">]><EndDevice/>', "EndDevice")


def test_dtds_and_entities_are_refused_in_any_encoding():
    """The DTD check looked for the bytes b"<!DOCTYPE", which a UTF-16 or UTF-32 document
    does not contain: an entity reference in one reached the schema validator and made a
    500 on every POST/PUT. Documents that are not UTF-8 are refused too (2030.5 is UTF-8)."""
    import pytest

    body = ('<?xml version="1.0" encoding="{enc}"?><!DOCTYPE LogEvent '
            '[<!ENTITY x "12345">]><LogEvent xmlns="urn:ieee:std:2030.5:ns">'
            '<createdDateTime>&x;</createdDateTime></LogEvent>')
    for enc in ("UTF-16", "UTF-32"):
        with pytest.raises(sep_xml.SepDocumentError, match="declarations|encoding"):
            sep_xml.parse(body.format(enc=enc).encode(enc.lower()), "LogEvent")
    plain = ('<?xml version="1.0" encoding="UTF-16"?><Time xmlns="urn:ieee:std:2030.5:ns">'
             '<currentTime>0</currentTime><dstEndTime>0</dstEndTime><dstOffset>0</dstOffset>'
             '<dstStartTime>0</dstStartTime><quality>7</quality><tzOffset>0</tzOffset></Time>')
    with pytest.raises(sep_xml.SepDocumentError, match="UTF-8"):
        sep_xml.parse(plain.encode("utf-16"), "Time")



def test_a_us_csip_der_capability_is_accepted():
    """Valid IEEE 2030.5-2018 with nothing of CSIP-AUS: the CSIP-AUS schema makes its
    doeModesSupported mandatory, so a US CSIP inverter's DERCapability got 400."""
    doc = ('<DERCapability xmlns="urn:ieee:std:2030.5:ns"><modesSupported>00500088'
           '</modesSupported><rtgMaxA><multiplier>0</multiplier><value>25</value></rtgMaxA>'
           '<rtgMaxVA><multiplier>0</multiplier><value>5000</value></rtgMaxVA><rtgMaxVar>'
           '<multiplier>0</multiplier><value>3000</value></rtgMaxVar><rtgMaxW><multiplier>0'
           '</multiplier><value>5000</value></rtgMaxW><type>4</type></DERCapability>')
    root = sep_xml.parse(doc.encode(), "DERCapability")
    assert root.findtext(f"{{{sep_xml.NS}}}rtgMaxW/{{{sep_xml.NS}}}value") == "5000"
    broken = doc.replace("<type>4</type>", "")               # type is required in 2018 too
    import pytest
    with pytest.raises(sep_xml.SepDocumentError):
        sep_xml.parse(broken.encode(), "DERCapability")
