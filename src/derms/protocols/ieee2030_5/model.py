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
