"""SQLAlchemy 2 models of the store: feeders, DER sites and devices, groups, meters,
time series, topology events, alarms and the append-only audit log.

Conventions (DESIGN.md): stable string ids; units in column names; times are aware UTC
(:class:`~derms.store.types.UTCTimestamp`); enums are stored as short strings with a
CHECK constraint (portable, no native PostgreSQL enum types to migrate). Relationships
are ``lazy="raise"``: load what you need explicitly (``selectinload``).

Power sign convention: a DER's own output ``p_gen_max_kw >= 0``, its charging
``p_charge_max_kw >= 0``; reactive power ``q_max_kvar >= 0`` is the most it can inject,
``q_min_kvar <= 0`` the most it can absorb (as a negative number).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

from derms.store.types import UTCTimestamp, ensure_utc, utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(64)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCTimestamp(), dict[str, Any]: JSON()}  # noqa: RUF012


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls, name=name, native_enum=False, create_constraint=True, length=24,
        values_callable=lambda e: [m.value for m in e], validate_strings=True,
    )


class DerType(enum.StrEnum):
    PV = "pv"
    BATTERY = "battery"
    EV_CHARGER = "ev_charger"
    WIND = "wind"
    GENERATOR = "generator"
    FLEXIBLE_LOAD = "flexible_load"
    OTHER = "other"


class Phase(enum.StrEnum):
    A = "a"
    B = "b"
    C = "c"
    AB = "ab"
    BC = "bc"
    CA = "ca"
    ABC = "abc"


class Protocol(enum.StrEnum):
    IEEE2030_5 = "ieee2030_5"
    OPENADR3 = "openadr3"
    SUNSPEC = "sunspec"
    MQTT = "mqtt"
    NONE = "none"


class DeviceStatus(enum.StrEnum):
    COMMISSIONING = "commissioning"
    ACTIVE = "active"
    INACTIVE = "inactive"
    FAULT = "fault"
    DECOMMISSIONED = "decommissioned"


class GroupKind(enum.StrEnum):
    FEEDER = "feeder"
    TRANSFORMER = "transformer"
    PHASE = "phase"
    PROGRAM = "program"


class SwitchState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class _Timestamps:
    """Validates every datetime attribute set on a model: naive → InputError, aware → UTC."""

    @validates("created_at", "valid_from", "t", "t_raised", "t_cleared", "t_acked",
               include_backrefs=False)
    def _utc(self, key: str, value: datetime | None) -> datetime | None:
        return None if value is None else ensure_utc(value, f"{type(self).__name__}.{key}")


class Feeder(_Timestamps, Base):
    __tablename__ = "feeders"
    feeder_id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    substation: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    model_versions: Mapped[list[FeederModelVersion]] = relationship(
        back_populates="feeder", lazy="raise", order_by="FeederModelVersion.version")


class FeederModelVersion(_Timestamps, Base):
    """One imported network model of a feeder (e.g. an OpenDSS master and its files' hash)."""

    __tablename__ = "feeder_model_versions"
    __table_args__ = (UniqueConstraint("feeder_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feeder_id: Mapped[str] = mapped_column(ForeignKey("feeders.feeder_id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    source_format: Mapped[str] = mapped_column(String(32), default="opendss")
    source_uri: Mapped[str] = mapped_column(Text, default="")
    sha256: Mapped[str | None] = mapped_column(String(64))
    valid_from: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # what the model has (derms.grid.elements.ModelElements.to_json: buses with their
    # nodes, transformers), stored at registration; None for versions stored before
    # migration 0009 or written directly (filled the first time it is needed)
    elements: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    feeder: Mapped[Feeder] = relationship(back_populates="model_versions", lazy="raise")


class DerSite(_Timestamps, Base):
    """A customer or utility site holding DER devices, at one service point."""

    __tablename__ = "der_sites"
    site_id: Mapped[str] = mapped_column(ID, primary_key=True)
    feeder_id: Mapped[str | None] = mapped_column(ForeignKey("feeders.feeder_id"), index=True)
    bus: Mapped[str | None] = mapped_column(String(64))
    service_transformer: Mapped[str | None] = mapped_column(String(64))
    owner: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    devices: Mapped[list[DerDevice]] = relationship(back_populates="site", lazy="raise")


class DerDevice(_Timestamps, Base):
    """A DER device with its nameplate and limits (sign convention in the module docstring)."""

    __tablename__ = "der_devices"
    __table_args__ = (
        CheckConstraint("p_gen_max_kw >= 0", name="p_gen_max_kw_nonneg"),
        CheckConstraint("p_charge_max_kw >= 0", name="p_charge_max_kw_nonneg"),
        CheckConstraint("s_max_kva > 0", name="s_max_kva_pos"),
        CheckConstraint("e_max_kwh IS NULL OR e_max_kwh >= 0", name="e_max_kwh_nonneg"),
        CheckConstraint("q_max_kvar >= 0 AND q_min_kvar <= 0", name="q_limits_sign"),
    )
    der_id: Mapped[str] = mapped_column(ID, primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("der_sites.site_id"), index=True)
    der_type: Mapped[DerType] = mapped_column(_enum(DerType, "der_type"))
    p_gen_max_kw: Mapped[float] = mapped_column(Float, default=0.0)
    p_charge_max_kw: Mapped[float] = mapped_column(Float, default=0.0)
    s_max_kva: Mapped[float] = mapped_column(Float)
    e_max_kwh: Mapped[float | None] = mapped_column(Float)
    q_max_kvar: Mapped[float] = mapped_column(Float, default=0.0)
    q_min_kvar: Mapped[float] = mapped_column(Float, default=0.0)
    phase: Mapped[Phase] = mapped_column(_enum(Phase, "phase"), default=Phase.ABC)
    bus: Mapped[str | None] = mapped_column(String(64))
    service_transformer: Mapped[str | None] = mapped_column(String(64), index=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    aggregator: Mapped[str | None] = mapped_column(String(200), index=True)
    protocol: Mapped[Protocol] = mapped_column(_enum(Protocol, "protocol"), default=Protocol.NONE)
    endpoint: Mapped[str | None] = mapped_column(String(500))
    status: Mapped[DeviceStatus] = mapped_column(
        _enum(DeviceStatus, "status"), default=DeviceStatus.COMMISSIONING)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    site: Mapped[DerSite] = relationship(back_populates="devices", lazy="raise")


class DerGroup(Base):
    """A group of devices by feeder, service transformer, phase or program; ``key`` is the
    feeder id, transformer name, phase or program name."""

    __tablename__ = "der_groups"
    __table_args__ = (UniqueConstraint("kind", "key", "feeder_id"),)
    group_id: Mapped[str] = mapped_column(ID, primary_key=True)
    kind: Mapped[GroupKind] = mapped_column(_enum(GroupKind, "kind"))
    key: Mapped[str] = mapped_column(String(200))
    feeder_id: Mapped[str | None] = mapped_column(ForeignKey("feeders.feeder_id"))
    description: Mapped[str] = mapped_column(Text, default="")
    members: Mapped[list[DerDevice]] = relationship(secondary="der_group_members", lazy="raise")


class DerGroupMember(Base):
    __tablename__ = "der_group_members"
    group_id: Mapped[str] = mapped_column(
        ForeignKey("der_groups.group_id", ondelete="CASCADE"), primary_key=True)
    der_id: Mapped[str] = mapped_column(
        ForeignKey("der_devices.der_id", ondelete="CASCADE"), primary_key=True, index=True)


class Meter(_Timestamps, Base):
    """An AMI meter at a service point."""

    __tablename__ = "meters"
    meter_id: Mapped[str] = mapped_column(ID, primary_key=True)
    site_id: Mapped[str | None] = mapped_column(ForeignKey("der_sites.site_id"), index=True)
    feeder_id: Mapped[str | None] = mapped_column(ForeignKey("feeders.feeder_id"), index=True)
    bus: Mapped[str | None] = mapped_column(String(64))
    service_transformer: Mapped[str | None] = mapped_column(String(64))
    phase: Mapped[Phase | None] = mapped_column(_enum(Phase, "phase"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Series(Base):
    """One time series: a device or a meter, a quantity with its unit (``p_kw``), a source.
    Exactly one of ``der_id`` / ``meter_id`` is set."""

    __tablename__ = "series"
    __table_args__ = (
        CheckConstraint("(der_id IS NULL) <> (meter_id IS NULL)", name="one_owner"),
        Index("uq_series_device", "der_id", "quantity", "source", unique=True,
              sqlite_where=text("der_id IS NOT NULL"),
              postgresql_where=text("der_id IS NOT NULL")),
        Index("uq_series_meter", "meter_id", "quantity", "source", unique=True,
              sqlite_where=text("meter_id IS NOT NULL"),
              postgresql_where=text("meter_id IS NOT NULL")),
    )
    series_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    der_id: Mapped[str | None] = mapped_column(ForeignKey("der_devices.der_id"))
    meter_id: Mapped[str | None] = mapped_column(ForeignKey("meters.meter_id"))
    quantity: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(32))


class Reading(Base):
    """One value of a series at time ``t``. The primary key (series_id, t) is the natural key
    (device or meter, quantity, source, time) and the index for time-range queries.
    ``quality`` holds :class:`derms.store.timeseries.Quality` bit flags (0 = good).

    No foreign key to ``series`` on purpose: PostgreSQL checks a foreign key row by row, which
    measured 12 s instead of 4.3 s for 1,000,000 rows; readings are only written by
    :mod:`derms.store.timeseries` with series ids it has just resolved, and deleting a series
    must delete its readings explicitly."""

    __tablename__ = "readings"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012
    series_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    t: Mapped[datetime] = mapped_column(primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    quality: Mapped[int] = mapped_column(SmallInteger, default=0)


TOPOLOGY_EVENT_KEY = ("feeder_id", "switch", "t", "state", "source")


class TopologyEvent(_Timestamps, Base):
    """A switch changing state (from ADMS, SCADA or an operator); names lower-case.

    One row per report: the same switch of a feeder in the same state at the same time
    from the same source is one event (unique ``TOPOLOGY_EVENT_KEY``, migration 0010).
    Another state at the same time is another event."""

    __tablename__ = "topology_events"
    __table_args__ = (Index("ix_topology_events_feeder_t", "feeder_id", "t"),
                      Index("uq_topology_events_report", *TOPOLOGY_EVENT_KEY, unique=True))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    feeder_id: Mapped[str] = mapped_column(ForeignKey("feeders.feeder_id"))
    switch: Mapped[str] = mapped_column(String(64))
    state: Mapped[SwitchState] = mapped_column(_enum(SwitchState, "state"))
    t: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(32), default="operator")


class Alarm(_Timestamps, Base):
    """An alarm on a feeder, device or meter; open while ``t_cleared`` is null."""

    __tablename__ = "alarms"
    __table_args__ = (Index("ix_alarms_t_raised", "t_raised"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[Severity] = mapped_column(_enum(Severity, "severity"))
    feeder_id: Mapped[str | None] = mapped_column(ForeignKey("feeders.feeder_id"))
    der_id: Mapped[str | None] = mapped_column(ForeignKey("der_devices.der_id"))
    meter_id: Mapped[str | None] = mapped_column(ForeignKey("meters.meter_id"))
    message: Mapped[str] = mapped_column(Text, default="")
    t_raised: Mapped[datetime] = mapped_column(default=utcnow)
    t_cleared: Mapped[datetime | None]
    t_acked: Mapped[datetime | None]
    acked_by: Mapped[str | None] = mapped_column(String(200))


class AuditEntry(_Timestamps, Base):
    """Append-only audit log; the database refuses UPDATE and DELETE (see the migration)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_t", "t"), Index("ix_audit_log_entity", "entity", "entity_id"))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    t: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiToken(_Timestamps, Base):
    """An API token: public id, SHA-256 of its secret (never the secret), scope, revocation."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("scope IN ('read', 'operate', 'admin')", name="scope_known"),
    )
    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    revoked: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ForecastModel(Base):
    """A trained global forecast model: one saved :class:`derms.forecast.model.QuantileModel`.

    ``version`` is the content hash returned by ``QuantileModel.save`` (same data and seed →
    same version: retraining records a new row only when the model changed); ``path`` is its
    folder (``<data_dir>/models/<name>/<version>``). ``spec`` holds the forecast spec and the
    targets it was trained on; ``metrics`` the training figures."""

    __tablename__ = "forecast_models"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        CheckConstraint("kind IN ('load', 'pv')", name="kind_known"),
        Index("ix_forecast_models_name_trained_at", "name", "trained_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    version: Mapped[str] = mapped_column(String(64))
    trained_at: Mapped[datetime]
    train_end: Mapped[datetime]
    n_series: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ForecastRun(Base):
    """One forecast of one series from one origin (``issued_at``, UTC) by one model; its
    values are rows of ``forecast_values`` for ``t`` in [issued_at, issued_at + horizon_s).
    The foreign keys do not cascade (a cascade would leave the values behind): delete runs
    with :func:`derms.store.forecasts.delete_runs` before their series or model."""

    __tablename__ = "forecast_runs"
    __table_args__ = (
        Index("ix_forecast_runs_series_issued", "series_id", "issued_at"),
        Index("ix_forecast_runs_model_id", "model_id"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.series_id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("forecast_models.id"))
    issued_at: Mapped[datetime]
    horizon_s: Mapped[int] = mapped_column(Integer)
    step_s: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ForecastValue(Base):
    """One forecast interval ``[t, t + step)`` of a run: quantiles in the series' unit.
    Written in bulk by :mod:`derms.store.forecasts` (never row by row through the ORM).

    No foreign key to ``forecast_runs`` on purpose (as for ``readings``): PostgreSQL checks
    it row by row, which measured 0.84 s instead of 0.19 s to COPY 96,000 rows (1,000 series
    × 96 intervals); values are only written with the run ids just inserted, and runs are
    deleted with :func:`derms.store.forecasts.delete_runs`, which deletes their values."""

    __tablename__ = "forecast_values"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012
    run_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                        primary_key=True)
    t: Mapped[datetime] = mapped_column(primary_key=True)
    p10: Mapped[float] = mapped_column(Float)
    p50: Mapped[float] = mapped_column(Float)
    p90: Mapped[float] = mapped_column(Float)


CONTROL_SOURCES = ("safety", "adms", "operator", "optimisation")
CONTROL_KINDS = ("block_dispatch", "limit_export", "limit_import", "abnormal_configuration",
                 "operator_setpoint", "optimisation_setpoint")
CONTROL_SCOPES = ("feeder", "section", "connection_point", "device")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class ControlRequestRecord(Base):
    """A control request of :mod:`derms.control` (safety, ADMS, operator, optimisation),
    stored so a restart rebuilds the arbiter. Applies in ``[start, min(expiry,
    withdrawn_at))``; ``ended_at``/``end_reason`` (``expired`` or ``withdrawn``) are set
    once the end has been recorded in the audit log. ``value_kw``: a limit magnitude
    (>= 0) or an import-positive device setpoint (see :mod:`derms.control.requests`).
    Scope: ``scope_kind`` with ``feeder_id`` (feeder, section), ``section_id`` and
    ``buses`` (section), ``connection_point`` or ``der_id``. No switch, regulator or
    capacitor kind exists (the CHECK constraint refuses one)."""

    __tablename__ = "control_requests"
    __table_args__ = (
        CheckConstraint(_in("source", CONTROL_SOURCES), name="source_known"),
        CheckConstraint(_in("kind", CONTROL_KINDS), name="kind_known"),
        CheckConstraint(_in("scope_kind", CONTROL_SCOPES), name="scope_kind_known"),
        CheckConstraint("expiry > start", name="expiry_after_start"),
        CheckConstraint("kind NOT IN ('limit_export', 'limit_import') OR value_kw >= 0",
                        name="limit_nonneg"),
        CheckConstraint("end_reason IS NULL OR end_reason IN ('expired', 'withdrawn')",
                        name="end_reason_known"),
        Index("ix_control_requests_open", "ended_at", "expiry"),
    )
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(32))
    scope_kind: Mapped[str] = mapped_column(String(24))
    feeder_id: Mapped[str | None] = mapped_column(String(200))
    section_id: Mapped[str | None] = mapped_column(String(200))
    buses: Mapped[list[str] | None] = mapped_column(JSON)
    connection_point: Mapped[str | None] = mapped_column(String(200))
    der_id: Mapped[str | None] = mapped_column(String(200))
    value_kw: Mapped[float | None] = mapped_column(Float)
    start: Mapped[datetime]
    expiry: Mapped[datetime]
    issued_at: Mapped[datetime]
    withdrawn_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(200), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @validates("start", "expiry", "issued_at", "withdrawn_at", "ended_at", "created_at",
               include_backrefs=False)
    def _utc(self, key: str, value: datetime | None) -> datetime | None:
        return None if value is None else ensure_utc(value, f"ControlRequestRecord.{key}")


class EnvelopeSet(Base):
    """A stored set of operating envelopes (one computation: feeder, policy, horizon),
    with the computation's summary (``derms.reports.envelopes_out.summary``)."""

    __tablename__ = "envelope_sets"
    __table_args__ = (Index("ix_envelope_sets_feeder_start", "feeder", "start"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feeder: Mapped[str] = mapped_column(String(200))
    policy: Mapped[str] = mapped_column(String(16))
    start: Mapped[datetime]
    step_s: Mapped[int] = mapped_column(Integer)
    n_intervals: Mapped[int] = mapped_column(Integer)
    n_connection_points: Mapped[int] = mapped_column(Integer)
    summary: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnvelopeValue(Base):
    """One connection point's envelope in one interval ``[t, t + step)`` of a set [kW, >= 0;
    null where that direction was not computed]. Written in bulk by
    :mod:`derms.store.envelopes`; no foreign key (as ``forecast_values``)."""

    __tablename__ = "envelope_values"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012
    set_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection_point: Mapped[str] = mapped_column(String(200), primary_key=True)
    t: Mapped[datetime] = mapped_column(primary_key=True)
    export_limit_kw: Mapped[float | None] = mapped_column(Float)
    import_limit_kw: Mapped[float | None] = mapped_column(Float)
