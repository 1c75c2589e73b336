"""The documents ``derms sim`` sends in control mode (``--feeder-id``), checked without a
server: valid IEEE 2030.5 (+ CSIP-AUS) XML, and mapped by the server's own mirror rules to
what the control loop reads (import-positive ``p_kw`` under the DER, per-phase head
SCADA ``p_a_kw``…``q_c_kvar`` under the head meter, the site's ``v_v``)."""

from __future__ import annotations

from datetime import UTC, datetime

from lxml import etree

from derms.protocols.ieee2030_5 import mirror_map as mm
from derms.protocols.ieee2030_5.model import MirrorUsagePointRecord
from derms.protocols.ieee2030_5.sep_xml import validation_errors
from derms.sim import sep_client as sc
from derms.sim.runner import _phase_letters

LFDI = "A" * 40
T = 1_780_000_000


def _stored(mup_xml: bytes, readings_xml: bytes) -> dict[str, float]:
    mup_doc, rd_doc = etree.fromstring(mup_xml), etree.fromstring(readings_xml)
    assert validation_errors(mup_doc) == [] and validation_errors(rd_doc) == []
    f = mm.mup_fields(mup_doc)
    rec = MirrorUsagePointRecord(1, f["mrid"], 1, f["device_lfdi"], LFDI, f["role_flags"],
                                 f["service_category_kind"], f["status"])
    types = {mm.mmr_mrid(el): mm.mmr_record(el).reading_type
             for el in mm.mirror_readings(mup_doc)}
    out = {}
    for el in mm.mirror_readings(rd_doc):
        for v in mm.values_of(el, types[mm.mmr_mrid(el)], rec, datetime.now(UTC)):
            assert v.t == datetime.fromtimestamp(T, UTC)
            out[v.quantity] = v.value
    return out


def test_der_usage_point_is_import_positive_under_the_der():
    # a battery discharging 3.2 kW and absorbing 0.4 kvar; then charging 2.5 kW
    assert _stored(sc.der_mup_xml(LFDI, 5), sc.der_readings_xml(LFDI, T, 3200, -400)) == {
        "p_kw": -3.2, "q_kvar": 0.4}
    assert _stored(sc.der_mup_xml(LFDI, 5), sc.der_readings_xml(LFDI, T, -2500, 0)) == {
        "p_kw": 2.5, "q_kvar": 0.0}


def test_head_rtu_mirrors_per_phase_scada_and_site_only_voltage():
    got = _stored(sc.head_mup_xml(LFDI, 5), sc.head_readings_xml(
        LFDI, T, [900e3, 600e3, 700e3], [300e3, 200e3, -100e3]))
    assert got == {"p_a_kw": 900.0, "p_b_kw": 600.0, "p_c_kw": 700.0, "q_a_kvar": 300.0,
                   "q_b_kvar": 200.0, "q_c_kvar": -100.0}
    site = _stored(sc.site_mup_xml(LFDI, 5, ("v",)),
                   sc.site_readings_xml(LFDI, T, 1500, 100, 2401.7, ("v",)))
    assert site == {"v_v": 2401.7}


def test_phase_letters_as_the_registry_spells_them():
    assert [_phase_letters(n) for n in ((1, 0), (2,), (3, 1), (1, 2, 3, 0), (0,))] == [
        "a", "b", "ca", "abc", "abc"]
