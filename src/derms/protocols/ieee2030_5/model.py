"""Protocol-side records the IEEE 2030.5 server serves (plain data, no XML, no storage).

Powers are in W at the site's connection point (CSIP-AUS): ``exp_lim_w`` bounds the export,
``imp_lim_w`` the import, ``gen_lim_w`` a device's generation/discharge and ``load_lim_w`` its
load/charge; all are non-negative magnitudes (the direction is in the name). Times are
timezone-aware UTC.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime


def new_mrid(pen: int = 0) -> str:
    """A 128-bit mRID as 32 hex digits; the last 32 bits carry the organisation's IANA PEN
    (IEEE 2030.5 §8.1.2.2 asks server-assigned mRIDs to end with it)."""
    return uuid.uuid4().hex[:24].upper() + f"{pen:08X}"


@dataclass(frozen=True)
class EndDeviceRecord:
    edev_id: int
    lfdi: str
    sfdi: int
    changed_time: datetime
    pin: int | None = None
    registered_time: datetime | None = None
    enabled: bool = True
    owner_lfdi: str | None = None  # the aggregator that registered it, if any
    nmi: str | None = None  # CSIP-AUS connection point id
    fsa_ids: tuple[int, ...] = ()
    #: where its mirrored telemetry is stored (derms.store ids): a DER device's readings
    #: under ``der_id``; the site meter's (premises aggregation point) under ``meter_id``,
    #: or under the connection point id when ``meter_id`` is not given
    der_id: str | None = None
    meter_id: str | None = None


@dataclass(frozen=True)
class FsaRecord:
    fsa_id: int
    mrid: str
    description: str
    program_ids: tuple[int, ...] = ()
    version: int = 0


@dataclass(frozen=True)
class DerLimits:
    """CSIP-AUS site limits in W (None: not set)."""

    exp_lim_w: float | None = None
    imp_lim_w: float | None = None
    gen_lim_w: float | None = None
    load_lim_w: float | None = None
    connect: bool | None = None
    energize: bool | None = None
    #: opModTargetW: the active power the DER should hold, W, positive = generating or
    #: discharging (IEEE 2030.5 sign), negative = consuming or charging
    target_w: float | None = None
    #: DERCurves (ids in the same DER program) the control turns on; None: not set
    volt_var_curve_id: int | None = None
    volt_watt_curve_id: int | None = None
    freq_watt_curve_id: int | None = None

    def curve_ids(self) -> dict[str, int]:
        """The DERControlBase curve modes set: element name → curve id."""
        pairs = (("opModFreqWatt", self.freq_watt_curve_id),
                 ("opModVoltVar", self.volt_var_curve_id),
                 ("opModVoltWatt", self.volt_watt_curve_id))
        return {tag: cid for tag, cid in pairs if cid is not None}


@dataclass(frozen=True)
class ProgramRecord:
    program_id: int
    mrid: str
    description: str
    primacy: int
    version: int = 0


@dataclass(frozen=True)
class DefaultControlRecord:
    program_id: int
    mrid: str
    limits: DerLimits
    description: str = ""
    version: int = 0
    set_grad_w: int | None = None  # ramp rate, hundredths of a percent of rating per second


@dataclass(frozen=True)
class ControlRecord:
    """A scheduled DERControl event in ``[start, start + duration_s)``.

    Who sees it (among the devices the program is assigned to): ``edev_id`` set — that end
    device only; ``connection_point`` set — the end devices registered at that CSIP-AUS
    connection point (NMI), i.e. a site's dynamic operating envelope; neither — every device.
    """

    control_id: int
    program_id: int
    mrid: str
    start: datetime
    duration_s: int
    limits: DerLimits
    creation_time: datetime
    description: str = ""
    edev_id: int | None = None
    connection_point: str | None = None
    randomize_start_s: int | None = None
    randomize_duration_s: int | None = None
    cancelled_time: datetime | None = None
    version: int = 0
    #: bitmap (0x01 received, 0x02 event-specific responses, 0x04 user opt-in/out); CSIP asks
    #: for responses to DER events
    response_required: int = 0x03
    extra: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ControlSpec:
    """What an operator asks for when adding a DERControl (see :class:`ControlRecord`);
    ``mrid`` None: the server assigns one."""

    program_id: int
    start: datetime
    duration_s: int
    limits: DerLimits
    description: str = ""
    edev_id: int | None = None
    connection_point: str | None = None
    randomize_start_s: int | None = None
    randomize_duration_s: int | None = None
    mrid: str | None = None


@dataclass(frozen=True)
class ResponseRecord:
    """A client's Response to an event (IEEE 2030.5 §8.10.3 / Table 27 status codes:
    1 received, 2 started, 3 completed, 4 opt out, 6 cancelled, 7 superseded, …)."""

    response_id: int
    control_id: int
    mrid: str  # the event's mRID (the Response's subject)
    edev_id: int
    lfdi: str  # endDeviceLFDI: the device responding (its own, or one behind an aggregator)
    status: int | None
    created_time: datetime | None  # as the client says
    received_time: datetime  # when the server stored it


@dataclass(frozen=True)
class ReadingTypeRecord:
    """The IEEE 2030.5 ReadingType fields that say what a mirrored value is (codes as the
    standard's enumerations; None: not given)."""

    uom: int | None = None  # UomType: 38 W, 63 var, 29 V, 72 Wh, 33 Hz, 61 VA, 5 A, …
    power_of_ten_multiplier: int = 0
    flow_direction: int = 0  # 0 n/a, 1 forward (delivered to the customer), 19 reverse
    phase: int = 0  # PhaseCode: 0 n/a, 128 A, 129 AN, 64 B, 65 BN, 32 C, 33 CN, 224 ABC, …
    kind: int | None = None  # KindType: 37 power, 12 energy, …
    accumulation_behaviour: int | None = None  # 9 summation, 4 delta, 12 instantaneous, …
    data_qualifier: int | None = None  # 2 average, 12 normal, …
    xml: bytes = field(default=b"", compare=False)  # the ReadingType as the client sent it


@dataclass(frozen=True)
class MirrorReadingRecord:
    """A MirrorMeterReading a client registered: its mRID names the reading type in later
    POSTs (IEEE 2030.5 §10.11.3)."""

    mrid: str
    description: str
    reading_type: ReadingTypeRecord


@dataclass(frozen=True)
class MirrorUsagePointRecord:
    """A MirrorUsagePoint created by a client's POST (IEEE 2030.5 §10.11): the readings of
    ``edev_id`` (the end device whose LFDI is the MUP's ``deviceLFDI``), posted by
    ``creator_lfdi`` (the device itself or its aggregator)."""

    mup_id: int
    mrid: str
    edev_id: int
    device_lfdi: str
    creator_lfdi: str
    role_flags: int
    service_category_kind: int
    status: int
    description: str = ""
    post_rate_s: int | None = None
    readings: tuple[MirrorReadingRecord, ...] = ()
    created_time: datetime | None = None

    #: RoleFlagsType bits (IEEE 2030.5)
    IS_MIRROR, IS_PREMISES_AGGREGATION_POINT, IS_PEV, IS_DER = 0x01, 0x02, 0x04, 0x08

    @property
    def is_site(self) -> bool:
        """The premises aggregation point: the site's meter at its connection point."""
        return bool(self.role_flags & self.IS_PREMISES_AGGREGATION_POINT)

    def reading(self, mrid: str) -> MirrorReadingRecord | None:
        return next((r for r in self.readings if r.mrid == mrid), None)


#: DERCurveType codes (IEEE 2030.5) of the curves the management API creates
CURVE_TYPES = {"freq_watt": 0, "volt_var": 11, "volt_watt": 12}


@dataclass(frozen=True)
class CurveRecord:
    """A DERCurve of a DER program (IEEE 2030.5 §10.10): up to 10 points ``(x, y)`` in the
    curve's own units — volt-var: x in % of the nominal voltage (100 = 1 pu), y in % of
    ``y_ref_type`` (2: setMaxVar; positive = the DER injects vars); volt-watt: x in % of
    nominal, y in % of setMaxW (1); freq-watt: x in Hz, y in % of setMaxW. Stored as floats;
    the server scales them to Int32 with ``x_multiplier``/``y_multiplier`` (powers of ten)."""

    curve_id: int
    program_id: int
    mrid: str
    curve_type: int
    x: tuple[float, ...]
    y: tuple[float, ...]
    y_ref_type: int
    creation_time: datetime
    description: str = ""
    x_multiplier: int = 0
    y_multiplier: int = 0
    ramp_dec_tms: int | None = None  # hundredths of a second
    ramp_inc_tms: int | None = None
    ramp_pt1_tms: int | None = None
    version: int = 0


@dataclass(frozen=True)
class LogEventRecord:
    """A LogEvent an end device POSTed (IEEE 2030.5 §10.15 / Table 12 codes)."""

    log_event_id: int  # server-assigned (the resource id)
    edev_id: int
    created_time: datetime
    function_set: int
    log_event_code: int
    device_log_event_id: int  # the client's logEventID
    log_event_pen: int
    profile_id: int
    details: str | None = None
    extended_data: int | None = None
    received_time: datetime | None = None


@dataclass(frozen=True)
class SubscriptionRecord:
    """A client's Subscription (IEEE 2030.5 §9.2 / §5.6): the server POSTs a Notification
    with the resource to ``notification_uri`` when ``subscribed_resource`` changes.
    ``owner_lfdi``: the certificate identity that created it; notifications render the
    resource as that client would see it."""

    subscription_id: int
    edev_id: int
    owner_lfdi: str
    subscribed_resource: str
    notification_uri: str
    limit: int
    level: str = "+S1"
    encoding: int = 0
    created_time: datetime | None = None
