"""Tables of the IEEE 2030.5 server's resources (``sep_*``), what
``derms.protocols.ieee2030_5.sql_repository`` writes through to and loads at start.

One row per protocol record (end devices, aggregators, function set assignments, programs,
DERControls, default controls, DER curves, client DER documents, responses, MirrorUsagePoints
and their MirrorMeterReadings, log events, subscriptions) with the record's fields as columns.
Ids are the server-assigned resource ids (no database sequences: the repository assigns them
and ``sep_counters`` keeps the next one of each kind, and the repository's change counter,
across restarts, so deleted rows' ids are never reused).

Small tuples that are always read and written whole and never queried are JSON arrays:
an end device's ``fsa_ids``, a function set assignment's ``program_ids`` and a curve's ``x``/
``y`` points. MirrorMeterReadings (with their ReadingType fields) are a child table.
Powers (CSIP-AUS limits) are W, non-negative magnitudes, null when not set; times are aware
UTC (:class:`~derms.store.types.UTCTimestamp`); client XML documents are stored as sent.
This module knows nothing of the protocol package (layering): the repository maps records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from derms.store.models import Base

LFDI = String(40)
MRID = String(32)


class SepCounter(Base):
    """``version`` (the repository's change counter) and ``next_<kind>`` (the next id of
    each kind of resource)."""

    __tablename__ = "sep_counters"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class SepEndDevice(Base):
    """An EndDevice (pre-registered by an operator or registered by a client)."""

    __tablename__ = "sep_end_devices"
    edev_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    lfdi: Mapped[str] = mapped_column(LFDI, unique=True)
    sfdi: Mapped[int] = mapped_column(BigInteger)
    changed_time: Mapped[datetime]
    pin: Mapped[int | None] = mapped_column(BigInteger)
    registered_time: Mapped[datetime | None]
    enabled: Mapped[bool] = mapped_column(Boolean)
    owner_lfdi: Mapped[str | None] = mapped_column(LFDI)  # the aggregator that registered it
    nmi: Mapped[str | None] = mapped_column(String(32))  # CSIP-AUS connection point id
    fsa_ids: Mapped[list[int]] = mapped_column(JSON)
    der_id: Mapped[str | None] = mapped_column(String(64))
    meter_id: Mapped[str | None] = mapped_column(String(64))


class SepAggregator(Base):
    """An LFDI whose client certificate may register other end devices."""

    __tablename__ = "sep_aggregators"
    lfdi: Mapped[str] = mapped_column(LFDI, primary_key=True)


class SepFsa(Base):
    __tablename__ = "sep_fsas"
    fsa_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mrid: Mapped[str] = mapped_column(MRID, unique=True)
    description: Mapped[str] = mapped_column(Text)
    program_ids: Mapped[list[int]] = mapped_column(JSON)
    version: Mapped[int] = mapped_column(Integer)


class SepProgram(Base):
    __tablename__ = "sep_programs"
    program_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mrid: Mapped[str] = mapped_column(MRID, unique=True)
    description: Mapped[str] = mapped_column(Text)
    primacy: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)


class _Limits:
    """DERControlBase: CSIP-AUS limits [W, >= 0, null: not set], the active power target
    [W, positive = generating or discharging], connect/energize, the curves (ids in the same
    program) the control turns on."""

    exp_lim_w: Mapped[float | None] = mapped_column(Float)
    imp_lim_w: Mapped[float | None] = mapped_column(Float)
    gen_lim_w: Mapped[float | None] = mapped_column(Float)
    load_lim_w: Mapped[float | None] = mapped_column(Float)
    target_w: Mapped[float | None] = mapped_column(Float)  # opModTargetW, + = generating
    connect: Mapped[bool | None] = mapped_column(Boolean)
    energize: Mapped[bool | None] = mapped_column(Boolean)
    volt_var_curve_id: Mapped[int | None] = mapped_column(Integer)
    volt_watt_curve_id: Mapped[int | None] = mapped_column(Integer)
    freq_watt_curve_id: Mapped[int | None] = mapped_column(Integer)


class SepControl(_Limits, Base):
    """A scheduled DERControl in ``[start, start + duration_s)``; audience: one end device,
    one connection point, or (both null) every device the program is assigned to."""

    __tablename__ = "sep_controls"
    __table_args__ = (Index("ix_sep_controls_program_id", "program_id"),)
    control_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    program_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_programs.program_id"))
    mrid: Mapped[str] = mapped_column(MRID, unique=True)
    start: Mapped[datetime]
    duration_s: Mapped[int] = mapped_column(BigInteger)
    creation_time: Mapped[datetime]
    description: Mapped[str] = mapped_column(Text)
    edev_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("sep_end_devices.edev_id"))
    connection_point: Mapped[str | None] = mapped_column(String(32))
    randomize_start_s: Mapped[int | None] = mapped_column(Integer)
    randomize_duration_s: Mapped[int | None] = mapped_column(Integer)
    cancelled_time: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(Integer)
    response_required: Mapped[int] = mapped_column(Integer)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class SepDefaultControl(_Limits, Base):
    """A program's DefaultDERControl (one per program, replaced in place)."""

    __tablename__ = "sep_default_controls"
    program_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_programs.program_id"),
                                            primary_key=True, autoincrement=False)
    mrid: Mapped[str] = mapped_column(MRID)
    description: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    set_grad_w: Mapped[int | None] = mapped_column(Integer)


class SepCurve(Base):
    """A DERCurve of a program; points in the curve's own units (floats)."""

    __tablename__ = "sep_curves"
    curve_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    program_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_programs.program_id"))
    mrid: Mapped[str] = mapped_column(MRID, unique=True)
    curve_type: Mapped[int] = mapped_column(Integer)
    x: Mapped[list[float]] = mapped_column(JSON)
    y: Mapped[list[float]] = mapped_column(JSON)
    y_ref_type: Mapped[int] = mapped_column(Integer)
    creation_time: Mapped[datetime]
    description: Mapped[str] = mapped_column(Text)
    x_multiplier: Mapped[int] = mapped_column(Integer)
    y_multiplier: Mapped[int] = mapped_column(Integer)
    ramp_dec_tms: Mapped[int | None] = mapped_column(Integer)
    ramp_inc_tms: Mapped[int | None] = mapped_column(Integer)
    ramp_pt1_tms: Mapped[int | None] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)


class SepDerDocument(Base):
    """The last DERCapability / DERSettings / DERStatus / DERAvailability an end device PUT
    (``kind``), as sent, and when the server stored it."""

    __tablename__ = "sep_der_documents"
    edev_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_end_devices.edev_id"),
                                         primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    xml: Mapped[bytes] = mapped_column(LargeBinary)
    received_time: Mapped[datetime]


class SepResponse(Base):
    """A client's Response to a DERControl (one per event, device and status)."""

    __tablename__ = "sep_responses"
    __table_args__ = (UniqueConstraint("control_id", "edev_id", "status",
                                       name="uq_sep_responses_control_edev_status"),)
    response_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    control_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_controls.control_id"))
    mrid: Mapped[str] = mapped_column(MRID)  # the event's mRID
    edev_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_end_devices.edev_id"))
    lfdi: Mapped[str] = mapped_column(LFDI)
    status: Mapped[int | None] = mapped_column(Integer)
    created_time: Mapped[datetime | None]
    received_time: Mapped[datetime]


class SepMirrorUsagePoint(Base):
    __tablename__ = "sep_mirror_usage_points"
    mup_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mrid: Mapped[str] = mapped_column(MRID, unique=True)
    edev_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_end_devices.edev_id"))
    device_lfdi: Mapped[str] = mapped_column(LFDI)
    creator_lfdi: Mapped[str] = mapped_column(LFDI)
    role_flags: Mapped[int] = mapped_column(Integer)
    service_category_kind: Mapped[int] = mapped_column(Integer)
    status: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text)
    post_rate_s: Mapped[int | None] = mapped_column(BigInteger)
    created_time: Mapped[datetime | None]


class SepMirrorReading(Base):
    """A MirrorMeterReading registered on a MirrorUsagePoint (``position``: its order) with
    its ReadingType (IEEE 2030.5 codes; the ReadingType XML as the client sent it)."""

    __tablename__ = "sep_mirror_readings"
    __table_args__ = (UniqueConstraint("mup_id", "mrid", name="uq_sep_mirror_readings_mup_mrid"),)
    mup_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_mirror_usage_points.mup_id"),
                                        primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mrid: Mapped[str] = mapped_column(MRID)
    description: Mapped[str] = mapped_column(Text)
    uom: Mapped[int | None] = mapped_column(Integer)
    power_of_ten_multiplier: Mapped[int] = mapped_column(Integer)
    flow_direction: Mapped[int] = mapped_column(Integer)
    phase: Mapped[int] = mapped_column(Integer)
    kind: Mapped[int | None] = mapped_column(Integer)
    accumulation_behaviour: Mapped[int | None] = mapped_column(Integer)
    data_qualifier: Mapped[int | None] = mapped_column(Integer)
    xml: Mapped[bytes] = mapped_column(LargeBinary)


class SepLogEvent(Base):
    """A LogEvent an end device POSTed (the newest ones per device are kept)."""

    __tablename__ = "sep_log_events"
    __table_args__ = (Index("ix_sep_log_events_edev_id", "edev_id", "log_event_id"),)
    log_event_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    edev_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_end_devices.edev_id"))
    created_time: Mapped[datetime]
    function_set: Mapped[int] = mapped_column(Integer)
    log_event_code: Mapped[int] = mapped_column(Integer)
    device_log_event_id: Mapped[int] = mapped_column(BigInteger)
    log_event_pen: Mapped[int] = mapped_column(BigInteger)
    profile_id: Mapped[int] = mapped_column(Integer)
    details: Mapped[str | None] = mapped_column(Text)
    extended_data: Mapped[int | None] = mapped_column(BigInteger)
    received_time: Mapped[datetime | None]


class SepSubscription(Base):
    """A client's Subscription: Notifications of ``subscribed_resource`` go to
    ``notification_uri`` (``item_limit``: the Subscription's ``limit``)."""

    __tablename__ = "sep_subscriptions"
    subscription_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    edev_id: Mapped[int] = mapped_column(Integer, ForeignKey("sep_end_devices.edev_id"))
    owner_lfdi: Mapped[str] = mapped_column(LFDI)
    subscribed_resource: Mapped[str] = mapped_column(Text)
    notification_uri: Mapped[str] = mapped_column(Text)
    item_limit: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(16))
    encoding: Mapped[int] = mapped_column(Integer)
    created_time: Mapped[datetime | None]


#: the tables in an order that respects their foreign keys (parents first)
SEP_TABLES = tuple(m.__table__ for m in (
    SepCounter, SepAggregator, SepEndDevice, SepProgram, SepFsa, SepCurve, SepControl,
    SepDefaultControl, SepDerDocument, SepResponse, SepMirrorUsagePoint, SepMirrorReading,
    SepLogEvent, SepSubscription))
