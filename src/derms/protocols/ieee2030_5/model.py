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
