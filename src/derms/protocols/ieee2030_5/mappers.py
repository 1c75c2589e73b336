"""Records → IEEE 2030.5 / CSIP-AUS XML elements (pure functions; the only place where protocol
scaling happens). Element order follows the schema's sequences exactly.

Hrefs are built from a ``Paths`` object so the base path is configurable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from lxml import etree

from derms.protocols.ieee2030_5.model import (
    ControlRecord,
    CurveRecord,
    DefaultControlRecord,
    DerLimits,
    EndDeviceRecord,
    FsaRecord,
    LogEventRecord,
    ProgramRecord,
    ResponseRecord,
    SubscriptionRecord,
)
from derms.protocols.ieee2030_5.sep_xml import CSIPAUS_NS, NS, XSI_NS, C, E, O

# EventStatus.currentStatus (IEEE 2030.5 EventStatus)
SCHEDULED, ACTIVE, CANCELLED, CANCELLED_RANDOM, SUPERSEDED = 0, 1, 2, 3, 4
TIME_QUALITY_NTP = 4  # "level 3 source" (server clock disciplined by NTP)
SUBSCRIBABLE = 1  # SubscribableType: non-conditional subscriptions supported


@dataclass(frozen=True)
class Paths:
    """The server's hrefs; ``prefix`` is the folder DeviceCapability is served in."""

    prefix: str = ""

    @property
    def dcap(self) -> str: return f"{self.prefix}/dcap"
    @property
    def tm(self) -> str: return f"{self.prefix}/tm"
    @property
    def edev_list(self) -> str: return f"{self.prefix}/edev"
    def edev(self, e: int) -> str: return f"{self.prefix}/edev/{e}"
    def reg(self, e: int) -> str: return f"{self.edev(e)}/rg"
    def cp(self, e: int) -> str: return f"{self.edev(e)}/cp"
    def fsa_list(self, e: int) -> str: return f"{self.edev(e)}/fsa"
    def fsa(self, e: int, f: int) -> str: return f"{self.edev(e)}/fsa/{f}"
    def fsa_programs(self, e: int, f: int) -> str: return f"{self.fsa(e, f)}/derp"
    def program(self, e: int, p: int) -> str: return f"{self.edev(e)}/derp/{p}"
    def controls(self, e: int, p: int) -> str: return f"{self.program(e, p)}/derc"
    def active_controls(self, e: int, p: int) -> str: return f"{self.program(e, p)}/actderc"
    def control(self, e: int, p: int, c: int) -> str: return f"{self.controls(e, p)}/{c}"
    def default_control(self, e: int, p: int) -> str: return f"{self.program(e, p)}/dderc"
    def curves(self, e: int, p: int) -> str: return f"{self.program(e, p)}/dc"
    def curve(self, e: int, p: int, c: int) -> str: return f"{self.curves(e, p)}/{c}"
    def log_events(self, e: int) -> str: return f"{self.edev(e)}/lel"
    def log_event(self, e: int, i: int) -> str: return f"{self.log_events(e)}/{i}"
    def subscriptions(self, e: int) -> str: return f"{self.edev(e)}/sub"
    def subscription(self, e: int, s: int) -> str: return f"{self.subscriptions(e)}/{s}"
    def der_list(self, e: int) -> str: return f"{self.edev(e)}/der"
    def der(self, e: int, d: int) -> str: return f"{self.der_list(e)}/{d}"
    def der_part(self, e: int, d: int, kind: str) -> str: return f"{self.der(e, d)}/{kind}"
    @property
    def responses(self) -> str: return f"{self.prefix}/rsps/1/rsp"  # one ResponseSet
    def response(self, r: int) -> str: return f"{self.responses}/{r}"
    @property
    def mup_list(self) -> str: return f"{self.prefix}/mup"
    def mup(self, m: int) -> str: return f"{self.mup_list}/{m}"


#: DER sub-resources a client PUTs: path segment → root element (IEEE 2030.5 §10.10.4).
DER_PARTS = {"dera": "DERAvailability", "dercap": "DERCapability", "derg": "DERSettings",
             "ders": "DERStatus"}


def epoch(t: datetime) -> int:
    """TimeType: whole seconds since 1970-01-01 UTC."""
    return int(t.timestamp())


def active_power(w: float, *, limit: bool = False) -> tuple[int, int]:
    """(value, multiplier) with value an Int16 and value × 10^multiplier ≈ ``w`` (W).

    The smallest multiplier in 0..9 that fits is used, so precision is kept: 5,000 W →
    (5000, 0); 123,456 W → (12346, 1). Negative inputs are accepted (Int16 is signed).
    ``limit``: the value is a maximum (an export, import, generation or load limit), so it
    is rounded toward zero, never past the limit set (123,456 W → (12345, 1); to nearest
    it went out 4 W looser), and a fraction of a watt keeps its precision with a
    negative multiplier (0.4 W → (400, -3); it went out as 0)."""
    if not math.isfinite(w):
        raise ValueError(f"active power {w!r} W: not a finite number")
    for mult in range(-3 if limit and 0 < abs(w) < 1 else 0, 10):
        scaled = w / 10.0**mult
        value = math.trunc(scaled) if limit else round(scaled)
        if -32768 <= value <= 32767:
            return value, mult
    raise ValueError(f"active power {w} W: beyond the range of ActivePower")


def w_from_active_power(value: int, multiplier: int) -> float:
    return float(value) * 10.0**multiplier


def _active_power_el(tag: str, w: float, ns: str = CSIPAUS_NS, *,
                     limit: bool = False) -> etree._Element:
    """An ActivePower element (CSIP-AUS namespace unless ``ns`` says otherwise);
    ``limit``: rounded toward zero (:func:`active_power`)."""
    value, mult = active_power(w, limit=limit)
    return E(tag, E("multiplier", mult), E("value", value), ns=ns)


def _list(tag: str, href: str, items: list[etree._Element], all_count: int,
          **attrs) -> etree._Element:
    el = E(tag, href=href, all=all_count, results=len(items), **attrs)
    for item in items:
        el.append(item)
    return el


def device_capability(paths: Paths, edev_count: int, poll_rate_s: int,
                      mup_count: int | None = None) -> etree._Element:
    """DeviceCapability; with ``mup_count`` it links the MirrorUsagePointList."""
    return E("DeviceCapability",
             E("TimeLink", href=paths.tm),
             E("EndDeviceListLink", href=paths.edev_list, all=edev_count),
             E("MirrorUsagePointListLink", href=paths.mup_list, all=mup_count)
             if mup_count is not None else None,
             href=paths.dcap, pollRate=poll_rate_s)


def time_resource(paths: Paths, now: datetime, poll_rate_s: int) -> etree._Element:
    """Time in UTC: no time-zone or daylight-saving offset is claimed."""
    t = epoch(now)
    return E("Time", E("currentTime", t), E("dstEndTime", 0), E("dstOffset", 0),
             E("dstStartTime", 0), E("localTime", t), E("quality", TIME_QUALITY_NTP),
             E("tzOffset", 0), href=paths.tm, pollRate=poll_rate_s)


def end_device(paths: Paths, rec: EndDeviceRecord) -> etree._Element:
    e = rec.edev_id
    el = E("EndDevice",
           E("DERListLink", href=paths.der_list(e), all=1),
           E("lFDI", rec.lfdi),
           E("LogEventListLink", href=paths.log_events(e)),
           E("sFDI", rec.sfdi),
           E("changedTime", epoch(rec.changed_time)),
           E("enabled", rec.enabled),
           E("FunctionSetAssignmentsListLink", href=paths.fsa_list(e), all=len(rec.fsa_ids)),
           E("RegistrationLink", href=paths.reg(e)) if rec.pin is not None else None,
           E("SubscriptionListLink", href=paths.subscriptions(e)),
           href=paths.edev(e), subscribable=0)  # not one of the subscribable routes: a
    # device trusting the flag got 400 for its subscription
    if rec.nmi:
        el.append(C("ConnectionPointLink", href=paths.cp(e)))
    return el


def end_device_list(paths: Paths, recs: list[EndDeviceRecord], all_count: int,
                    poll_rate_s: int) -> etree._Element:
    return _list("EndDeviceList", paths.edev_list, [end_device(paths, r) for r in recs],
                 all_count, pollRate=poll_rate_s, subscribable=SUBSCRIBABLE)


def der(paths: Paths, edev_id: int, der_id: int) -> etree._Element:
    """The DER of an end device with links to what its client PUTs (schema order)."""
    return E("DER",
             E("DERAvailabilityLink", href=paths.der_part(edev_id, der_id, "dera")),
             E("DERCapabilityLink", href=paths.der_part(edev_id, der_id, "dercap")),
             E("DERSettingsLink", href=paths.der_part(edev_id, der_id, "derg")),
             E("DERStatusLink", href=paths.der_part(edev_id, der_id, "ders")),
             href=paths.der(edev_id, der_id))


def der_list(paths: Paths, edev_id: int, items: list[etree._Element], all_count: int,
             poll_rate_s: int) -> etree._Element:
    return _list("DERList", paths.der_list(edev_id), items, all_count, pollRate=poll_rate_s)


def with_href(doc: etree._Element, href: str) -> etree._Element:
    """A stored client document served back at ``href``."""
    doc.set("href", href)
    return doc


def document_dict(el: etree._Element) -> dict:
    """A plain view of a document for the management API: local names → text, nested
    elements → dicts, repeated elements → lists; attributes other than ``href`` kept."""
    out: dict = {k: v for k, v in el.attrib.items() if k != "href"}
    groups: dict[str, list] = {}
    for child in el:
        if not isinstance(child.tag, str):
            continue
        value = document_dict(child) if len(child) or child.attrib else (child.text or "")
        groups.setdefault(etree.QName(child).localname, []).append(value)
    out.update({k: v[0] if len(v) == 1 else v for k, v in groups.items()})
    return out


def response(paths: Paths, rec: ResponseRecord) -> etree._Element:
    """A stored response, served back as a ``Response`` (schema order)."""
    return E("Response",
             O("createdDateTime", epoch(rec.created_time) if rec.created_time else None),
             E("endDeviceLFDI", rec.lfdi), O("status", rec.status), E("subject", rec.mrid),
             href=paths.response(rec.response_id))


def response_list(paths: Paths, recs: list[ResponseRecord], all_count: int) -> etree._Element:
    return _list("ResponseList", paths.responses, [response(paths, r) for r in recs],
                 all_count)


def registration(paths: Paths, rec: EndDeviceRecord) -> etree._Element:
    assert rec.pin is not None and rec.registered_time is not None
    return E("Registration", E("dateTimeRegistered", epoch(rec.registered_time)),
             E("pIN", rec.pin), href=paths.reg(rec.edev_id))


def connection_point(paths: Paths, rec: EndDeviceRecord) -> etree._Element:
    return C("ConnectionPoint", C("connectionPointId", rec.nmi), href=paths.cp(rec.edev_id))


def fsa(paths: Paths, edev_id: int, rec: FsaRecord) -> etree._Element:
    return E("FunctionSetAssignments",
             E("DERProgramListLink", href=paths.fsa_programs(edev_id, rec.fsa_id),
               all=len(rec.program_ids)),
             E("TimeLink", href=paths.tm),
             E("mRID", rec.mrid), O("description", rec.description[:32]),
             E("version", rec.version),
             href=paths.fsa(edev_id, rec.fsa_id))


def fsa_list(paths: Paths, edev_id: int, recs: list[FsaRecord], all_count: int,
             poll_rate_s: int) -> etree._Element:
    return _list("FunctionSetAssignmentsList", paths.fsa_list(edev_id),
                 [fsa(paths, edev_id, r) for r in recs], all_count, pollRate=poll_rate_s,
                 subscribable=SUBSCRIBABLE)


def program(paths: Paths, edev_id: int, rec: ProgramRecord, *, n_controls: int,
            has_default: bool, n_curves: int = 0) -> etree._Element:
    p = rec.program_id
    return E("DERProgram",
             E("mRID", rec.mrid), O("description", rec.description[:32]),
             E("version", rec.version),
             E("ActiveDERControlListLink", href=paths.active_controls(edev_id, p)),
             E("DefaultDERControlLink", href=paths.default_control(edev_id, p))
             if has_default else None,
             E("DERControlListLink", href=paths.controls(edev_id, p), all=n_controls),
             E("DERCurveListLink", href=paths.curves(edev_id, p), all=n_curves)
             if n_curves else None,
             E("primacy", rec.primacy),
             href=paths.program(edev_id, p), subscribable=SUBSCRIBABLE)


def program_list(href: str, items: list[etree._Element], all_count: int,
                 poll_rate_s: int) -> etree._Element:
    return _list("DERProgramList", href, items, all_count, pollRate=poll_rate_s,
                 subscribable=SUBSCRIBABLE)


def der_control_base(limits: DerLimits, curve_href=None) -> etree._Element:
    """DERControlBase: IEEE elements first, then the CSIP-AUS ones (schema order).
    ``curve_href(curve_id) -> href``: where the device reads a curve the control turns on
    (required when ``limits`` names curves)."""
    curves = limits.curve_ids()

    def curve_link(tag: str) -> etree._Element | None:
        return E(tag, href=curve_href(curves[tag])) if tag in curves else None

    el = E("DERControlBase",
           E("opModConnect", limits.connect) if limits.connect is not None else None,
           E("opModEnergize", limits.energize) if limits.energize is not None else None,
           curve_link("opModFreqWatt"),
           _active_power_el("opModTargetW", limits.target_w, ns=NS)
           if limits.target_w is not None else None,
           curve_link("opModVoltVar"), curve_link("opModVoltWatt"))
    for tag, w in (("opModImpLimW", limits.imp_lim_w), ("opModExpLimW", limits.exp_lim_w),
                   ("opModGenLimW", limits.gen_lim_w), ("opModLoadLimW", limits.load_lim_w)):
        if w is not None:
            el.append(_active_power_el(tag, w, limit=True))
    return el


def control_status(rec: ControlRecord, now: datetime,
                   superseded_time: datetime | None = None) -> int:
    """EventStatus.currentStatus: cancelled, superseded (``superseded_time``: when a newer
    overlapping event of the same program was created), else active or scheduled."""
    if rec.cancelled_time is not None:
        return CANCELLED
    if superseded_time is not None:
        return SUPERSEDED
    start = epoch(rec.start)
    return ACTIVE if start <= epoch(now) < start + rec.duration_s else SCHEDULED


def der_control(href: str, rec: ControlRecord, now: datetime,
                reply_to: str | None = None, *, superseded_time: datetime | None = None,
                curve_href=None) -> etree._Element:
    """A DERControl; with ``reply_to`` (the ResponseList href) devices are asked to respond
    as ``response_required`` says. ``superseded_time``: see :func:`control_status`."""
    status = control_status(rec, now, superseded_time)
    status_time = (rec.cancelled_time if status == CANCELLED else superseded_time
                   if status == SUPERSEDED else rec.creation_time)
    return E("DERControl",
             E("mRID", rec.mrid), O("description", rec.description[:32]),
             E("version", rec.version),
             E("creationTime", epoch(rec.creation_time)),
             E("EventStatus", E("currentStatus", status),
               E("dateTime", epoch(status_time)), E("potentiallySuperseded", False)),
             E("interval", E("duration", rec.duration_s), E("start", epoch(rec.start))),
             O("randomizeDuration", rec.randomize_duration_s),
             O("randomizeStart", rec.randomize_start_s),
             der_control_base(rec.limits, curve_href),
             href=href, replyTo=reply_to,
             responseRequired=f"{rec.response_required:02X}" if reply_to else None)


def der_control_list(href: str, items: list[etree._Element], all_count: int) -> etree._Element:
    return _list("DERControlList", href, items, all_count, subscribable=SUBSCRIBABLE)


def default_der_control(href: str, rec: DefaultControlRecord,
                        curve_href=None) -> etree._Element:
    return E("DefaultDERControl",
             E("mRID", rec.mrid), O("description", rec.description[:32]),
             E("version", rec.version),
             der_control_base(rec.limits, curve_href),
             O("setGradW", rec.set_grad_w),
             href=href, subscribable=SUBSCRIBABLE)


def curve(href: str, rec: CurveRecord) -> etree._Element:
    """A DERCurve: points scaled to Int32 by the record's power-of-ten multipliers."""
    def scaled(value: float, mult: int) -> int:
        return round(value / 10.0**mult)

    points = [E("CurveData", E("xvalue", scaled(x, rec.x_multiplier)),
                E("yvalue", scaled(y, rec.y_multiplier))) for x, y in zip(rec.x, rec.y,
                                                                          strict=True)]
    return E("DERCurve",
             E("mRID", rec.mrid), O("description", rec.description[:32]),
             E("version", rec.version),
             E("creationTime", epoch(rec.creation_time)),
             *points,
             E("curveType", rec.curve_type),
             O("rampDecTms", rec.ramp_dec_tms), O("rampIncTms", rec.ramp_inc_tms),
             O("rampPT1Tms", rec.ramp_pt1_tms),
             E("xMultiplier", rec.x_multiplier), E("yMultiplier", rec.y_multiplier),
             E("yRefType", rec.y_ref_type),
             href=href)


def curve_list(href: str, items: list[etree._Element], all_count: int) -> etree._Element:
    return _list("DERCurveList", href, items, all_count)


def log_event(href: str, rec: LogEventRecord) -> etree._Element:
    return E("LogEvent",
             E("createdDateTime", epoch(rec.created_time)), O("details", rec.details),
             O("extendedData", rec.extended_data), E("functionSet", rec.function_set),
             E("logEventCode", rec.log_event_code), E("logEventID", rec.device_log_event_id),
             E("logEventPEN", rec.log_event_pen), E("profileID", rec.profile_id),
             href=href)


def log_event_list(href: str, items: list[etree._Element], all_count: int,
                   poll_rate_s: int) -> etree._Element:
    return _list("LogEventList", href, items, all_count, pollRate=poll_rate_s)


def subscription(href: str, rec: SubscriptionRecord) -> etree._Element:
    return E("Subscription",
             E("subscribedResource", rec.subscribed_resource),
             E("encoding", rec.encoding), E("level", rec.level), E("limit", rec.limit),
             E("notificationURI", rec.notification_uri),
             href=href)


def subscription_list(href: str, items: list[etree._Element], all_count: int
                      ) -> etree._Element:
    return _list("SubscriptionList", href, items, all_count)


#: Notification.status (IEEE 2030.5): 0 default (the resource changed), 1 subscription
#: cancelled without further information, 4 the subscribed resource was deleted
NOTIFY_CHANGED, NOTIFY_CANCELLED, NOTIFY_DELETED = 0, 1, 4


def notification(rec: SubscriptionRecord, subscription_href: str,
                 resource: etree._Element | None, status: int = NOTIFY_CHANGED
                 ) -> etree._Element:
    """A Notification carrying ``resource`` (a rendered document: it becomes the
    ``Resource`` element with ``xsi:type`` set to its own type)."""
    res = None
    if resource is not None:
        type_name = etree.QName(resource).localname
        res = etree.SubElement(etree.Element("tmp"), f"{{{NS}}}Resource",
                               nsmap={None: NS, "xsi": XSI_NS})
        res.set(f"{{{XSI_NS}}}type", type_name)
        for key, value in resource.attrib.items():
            res.set(key, value)
        res.extend(list(resource))
    el = E("Notification",
           E("subscribedResource", rec.subscribed_resource),
           res,
           E("status", status),
           E("subscriptionURI", subscription_href))
    return el


def limits_from_control_base(el: etree._Element) -> DerLimits:
    """The inverse of :func:`der_control_base` for incoming documents (W)."""
    def power(tag: str, ns: str = CSIPAUS_NS) -> float | None:
        found = el.find(f"{{{ns}}}{tag}")
        if found is None:
            return None
        return w_from_active_power(int(found.findtext(f"{{{NS}}}value")),
                                   int(found.findtext(f"{{{NS}}}multiplier")))

    def flag(tag: str) -> bool | None:
        text = el.findtext(f"{{{NS}}}{tag}")
        return None if text is None else text.strip() in ("true", "1")

    return DerLimits(exp_lim_w=power("opModExpLimW"), imp_lim_w=power("opModImpLimW"),
                     gen_lim_w=power("opModGenLimW"), load_lim_w=power("opModLoadLimW"),
                     connect=flag("opModConnect"), energize=flag("opModEnergize"),
                     target_w=power("opModTargetW", NS))
