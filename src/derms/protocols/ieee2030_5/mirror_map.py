"""Metering mirror documents ↔ records, and mirrored readings → derms telemetry rows.

The only place where the mirror's scaling and sign conventions are translated (DESIGN:
"protocol scaling happens only in mappers"). What is stored, per MirrorMeterReading's
ReadingType:

| uom | quantity | value |
|---|---|---|
| 38 W | ``p_kw`` | value × 10^powerOfTenMultiplier / 1000, import positive |
| 63 var | ``q_kvar`` | as W (same orientation as the real power) |
| 29 V | ``v_v`` | value × 10^m |
| 72 Wh | ``e_kwh`` (net, flowDirection 0 or 4), ``e_imp_kwh`` / ``e_exp_kwh`` (a forward or reverse register) | value × 10^m / 1000 |
| 61 VA, 5 A, 33 Hz | ``s_kva``, ``i_a``, ``f_hz`` | value × 10^m (/1000 for VA) |

Per-phase readings (PhaseCode A/AN, B/BN, C/CN) get the phase in the name (``p_a_kw``,
``v_b_v``); 0 (not applicable) and 224 (ABC) are the totals; line-to-line and other codes,
and other units (power factor among them), are accepted but not stored.

Sign (derms stores power import-positive at the device's or site's connection point):
FlowDirectionType 1 "forward" is *delivered to the customer*. At the premises aggregation
point (the site meter, roleFlags bit 1) that is import: forward → +, reverse (19) → −. For a
DER's usage point (roleFlags isDER, bit 3, and not the site) forward is the DER's output, as
CSIP-AUS clients post it: forward → −, reverse → +. Other usage points (loads, EVs): as
the site. flowDirection 0 (not applicable) carries the sign on the value, load convention
(positive = consumption); 4 (net, 2023 edition) is forward minus reverse.

Time of a reading: its ``timePeriod/start`` (the store's interval ``[start, start +
duration)``), else its set's ``timePeriod/start``, else the MirrorMeterReading's
``lastUpdateTime``, else the time the server received it (then a repeated POST stores it
again). Quality: qualityFlags bits 2, 3 (estimated), 5 (derived) and 6 (projected) →
``ESTIMATED``; a value outside the quantity's plausible range (derms.ingest.units) →
``OUT_OF_RANGE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from derms.ingest.units import QUANTITIES
from derms.protocols.ieee2030_5.model import (
    MirrorReadingRecord,
    MirrorUsagePointRecord,
    ReadingTypeRecord,
)
from derms.protocols.ieee2030_5.sep_xml import NS, E, O, child_text
from derms.store.timeseries import Quality

Q = f"{{{NS}}}"
FORWARD, REVERSE, NET = 1, 19, 4

#: uom → (quantity stem, unit, power of ten to that unit, signed)
_UOM: dict[int, tuple[str, str, int, bool]] = {
    38: ("p", "kw", -3, True), 63: ("q", "kvar", -3, True), 72: ("e", "kwh", -3, True),
    29: ("v", "v", 0, False), 61: ("s", "kva", -3, False), 5: ("i", "a", 0, False),
    33: ("f", "hz", 0, False),
}
_PHASE = {0: "", 224: "", 128: "_a", 129: "_a", 64: "_b", 65: "_b", 32: "_c", 33: "_c"}
_ESTIMATED_BITS = (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6)


@dataclass(frozen=True)
class Target:
    """Where a mirrored reading type goes: a quantity and ``sign × value × 10^exp10``."""

    quantity: str
    sign: float
    exp10: int

    def value(self, raw: int) -> float:
        """The stored value of a wire value (dividing by a power of ten for negative
        exponents, so 700 × 10^-3 is 0.7 exactly as a float can hold it)."""
        scaled = raw * 10**self.exp10 if self.exp10 >= 0 else raw / 10**-self.exp10
        return self.sign * scaled


def target(rt: ReadingTypeRecord, mup: MirrorUsagePointRecord) -> Target | None:
    """The stored quantity and scale of a reading type on a usage point; None when it is
    not stored (see the module docstring)."""
    found = _UOM.get(rt.uom) if rt.uom is not None else None
    phase = _PHASE.get(rt.phase)
    if found is None or phase is None:
        return None
    stem, unit, exp10, signed = found
    exp10 += rt.power_of_ten_multiplier
    if not signed:
        return Target(f"{stem}{phase}_{unit}", 1.0, exp10)
    der = bool(mup.role_flags & mup.IS_DER) and not mup.is_site
    flow = rt.flow_direction
    if flow not in (0, FORWARD, REVERSE, NET):
        return None
    if stem == "e" and flow in (FORWARD, REVERSE):
        imported = (flow == FORWARD) != der  # a DER's forward register is its output
        return Target(f"e{phase}_{'imp' if imported else 'exp'}_kwh", 1.0, exp10)
    sign = -1.0 if der and flow in (FORWARD, NET) else 1.0
    if flow == REVERSE:
        sign = 1.0 if der else -1.0
    return Target(f"{stem}{phase}_{unit}", sign, exp10)


def _range_of(quantity: str) -> tuple[float, float]:
    parts = quantity.split("_")
    base = f"{parts[0]}_{parts[-1]}"
    q = QUANTITIES.get(base)
    return (q.lo, q.hi) if q else (float("-inf"), float("inf"))


@dataclass(frozen=True)
class MirroredValue:
    """One reading ready for the store (owner added by the caller)."""

    quantity: str
    t: datetime
    value: float
    quality: int


# --- incoming documents ----------------------------------------------------------------------

def _int(el: etree._Element, tag: str, default: int | None = None) -> int | None:
    text = child_text(el, tag)
    return default if text is None else int(text)


def reading_type(el: etree._Element) -> ReadingTypeRecord:
    return ReadingTypeRecord(
        uom=_int(el, "uom"), power_of_ten_multiplier=_int(el, "powerOfTenMultiplier", 0),
        flow_direction=_int(el, "flowDirection", 0), phase=_int(el, "phase", 0),
        kind=_int(el, "kind"), accumulation_behaviour=_int(el, "accumulationBehaviour"),
        data_qualifier=_int(el, "dataQualifier"),
        xml=etree.tostring(el))


def mirror_readings(doc: etree._Element) -> list[etree._Element]:
    """The MirrorMeterReading elements of a MirrorUsagePoint, a MirrorMeterReadingList or a
    single MirrorMeterReading."""
    if etree.QName(doc).localname == "MirrorMeterReading":
        return [doc]
    return doc.findall(f"{Q}MirrorMeterReading")


def mmr_mrid(el: etree._Element) -> str:
    return (child_text(el, "mRID") or "").upper()


def mmr_record(el: etree._Element) -> MirrorReadingRecord | None:
    """The registration an MMR carries (None when it has no ReadingType)."""
    rt = el.find(f"{Q}ReadingType")
    if rt is None:
        return None
    return MirrorReadingRecord(mmr_mrid(el), child_text(el, "description") or "",
                               reading_type(rt))


def mup_fields(doc: etree._Element) -> dict:
    """The MirrorUsagePoint's own fields (validated document)."""
    post_rate = child_text(doc, "postRate")
    return {
        "mrid": (child_text(doc, "mRID") or "").upper(),
        "description": child_text(doc, "description") or "",
        "device_lfdi": (child_text(doc, "deviceLFDI") or "").upper(),
        "role_flags": int(child_text(doc, "roleFlags") or "0", 16),
        "service_category_kind": int(child_text(doc, "serviceCategoryKind") or "0"),
        "status": int(child_text(doc, "status") or "0"),
        "post_rate_s": int(post_rate) if post_rate is not None else None,
    }


def values_of(mmr: etree._Element, rt: ReadingTypeRecord, mup: MirrorUsagePointRecord,
              received: datetime) -> list[MirroredValue]:
    """The storable readings of one MirrorMeterReading (empty when its type is not
    stored)."""
    tgt = target(rt, mup)
    if tgt is None:
        return []
    last = child_text(mmr, "lastUpdateTime")
    fallback = int(last) if last is not None else None
    lo, hi = _range_of(tgt.quantity)
    out: list[MirroredValue] = []
    groups: list[tuple[etree._Element, int | None]] = [
        (r, fallback) for r in mmr.findall(f"{Q}Reading")]
    for rs in mmr.findall(f"{Q}MirrorReadingSet"):
        start = rs.findtext(f"{Q}timePeriod/{Q}start")
        groups += [(r, int(start) if start is not None else fallback)
                   for r in rs.findall(f"{Q}Reading")]
    for reading, default_t in groups:
        text = child_text(reading, "value")
        if text is None:
            continue
        start = reading.findtext(f"{Q}timePeriod/{Q}start")
        t_s = int(start) if start is not None else default_t
        t = datetime.fromtimestamp(t_s, UTC) if t_s is not None else received
        value = tgt.value(int(text))
        flags = int(child_text(reading, "qualityFlags") or "0", 16)
        quality = Quality.ESTIMATED if flags & _ESTIMATED_BITS else Quality.GOOD
        if not lo <= value <= hi:
            quality |= Quality.OUT_OF_RANGE
        out.append(MirroredValue(tgt.quantity, t, value, int(quality)))
    return out


# --- served documents ------------------------------------------------------------------------

def mirror_usage_point(href: str, rec: MirrorUsagePointRecord) -> etree._Element:
    """A MUP as served back (schema order): its registered MirrorMeterReadings with their
    ReadingTypes, no readings (those are in the historian)."""
    el = E("MirrorUsagePoint", E("mRID", rec.mrid), O("description", rec.description[:32]),
           E("roleFlags", f"{rec.role_flags:04X}"),
           E("serviceCategoryKind", rec.service_category_kind), E("status", rec.status),
           E("deviceLFDI", rec.device_lfdi), href=href)
    for r in rec.readings:
        mmr = E("MirrorMeterReading", E("mRID", r.mrid), O("description", r.description[:32]))
        if r.reading_type.xml:
            mmr.append(etree.fromstring(r.reading_type.xml))
        el.append(mmr)
    if rec.post_rate_s is not None:
        el.append(E("postRate", rec.post_rate_s))
    return el
