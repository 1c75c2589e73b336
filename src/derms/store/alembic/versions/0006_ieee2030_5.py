"""ieee2030_5: the IEEE 2030.5 server's resources (sep_* tables of derms.store.sep)

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from derms.store.types import UTCTimestamp

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

MRID = sa.String(length=32)
LFDI = sa.String(length=40)


def _id(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), autoincrement=False, nullable=False)


def _col(name: str, type_, nullable: bool = False) -> sa.Column:
    return sa.Column(name, type_, nullable=nullable)


def _pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(*columns, name=op.f(f"pk_{table}"))


def _fk(table: str, column: str, parent: str, parent_column: str | None = None
        ) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{parent}.{parent_column or column}"],
                                   name=op.f(f"fk_{table}_{column}_{parent}"))


def _unique_mrid(table: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint("mrid", name=op.f(f"uq_{table}_mrid"))


def _limits() -> list[sa.Column]:
    """DERControlBase columns of sep_controls and sep_default_controls."""
    return [_col(n, sa.Float(), True) for n in ("exp_lim_w", "imp_lim_w", "gen_lim_w",
                                               "load_lim_w", "target_w")] + [
        _col("connect", sa.Boolean(), True), _col("energize", sa.Boolean(), True)] + [
        _col(n, sa.Integer(), True) for n in ("volt_var_curve_id", "volt_watt_curve_id",
                                              "freq_watt_curve_id")]


def upgrade() -> None:
    op.create_table(
        "sep_counters",
        _col("name", sa.String(length=32)),
        _col("value", sa.BigInteger()),
        _pk("sep_counters", "name"),
    )
    op.create_table(
        "sep_aggregators",
        _col("lfdi", LFDI),
        _pk("sep_aggregators", "lfdi"),
    )
    op.create_table(
        "sep_end_devices",
        _id("edev_id"),
        _col("lfdi", LFDI),
        _col("sfdi", sa.BigInteger()),
        _col("changed_time", UTCTimestamp()),
        _col("pin", sa.BigInteger(), True),
        _col("registered_time", UTCTimestamp(), True),
        _col("enabled", sa.Boolean()),
        _col("owner_lfdi", LFDI, True),
        _col("nmi", sa.String(length=32), True),
        _col("fsa_ids", sa.JSON()),
        _col("der_id", sa.String(length=64), True),
        _col("meter_id", sa.String(length=64), True),
        _pk("sep_end_devices", "edev_id"),
        sa.UniqueConstraint("lfdi", name=op.f("uq_sep_end_devices_lfdi")),
    )
    op.create_table(
        "sep_programs",
        _id("program_id"),
        _col("mrid", MRID),
        _col("description", sa.Text()),
        _col("primacy", sa.Integer()),
        _col("version", sa.Integer()),
        _pk("sep_programs", "program_id"),
        _unique_mrid("sep_programs"),
    )
    op.create_table(
        "sep_fsas",
        _id("fsa_id"),
        _col("mrid", MRID),
        _col("description", sa.Text()),
        _col("program_ids", sa.JSON()),
        _col("version", sa.Integer()),
        _pk("sep_fsas", "fsa_id"),
        _unique_mrid("sep_fsas"),
    )
    op.create_table(
        "sep_curves",
        _id("curve_id"),
        _col("program_id", sa.Integer()),
        _col("mrid", MRID),
        _col("curve_type", sa.Integer()),
        _col("x", sa.JSON()),
        _col("y", sa.JSON()),
        _col("y_ref_type", sa.Integer()),
        _col("creation_time", UTCTimestamp()),
        _col("description", sa.Text()),
        _col("x_multiplier", sa.Integer()),
        _col("y_multiplier", sa.Integer()),
        _col("ramp_dec_tms", sa.Integer(), True),
        _col("ramp_inc_tms", sa.Integer(), True),
        _col("ramp_pt1_tms", sa.Integer(), True),
        _col("version", sa.Integer()),
        _fk("sep_curves", "program_id", "sep_programs"),
        _pk("sep_curves", "curve_id"),
        _unique_mrid("sep_curves"),
    )
    op.create_table(
        "sep_controls",
        _id("control_id"),
        _col("program_id", sa.Integer()),
        _col("mrid", MRID),
        _col("start", UTCTimestamp()),
        _col("duration_s", sa.BigInteger()),
        _col("creation_time", UTCTimestamp()),
        _col("description", sa.Text()),
        _col("edev_id", sa.Integer(), True),
        _col("connection_point", sa.String(length=32), True),
        _col("randomize_start_s", sa.Integer(), True),
        _col("randomize_duration_s", sa.Integer(), True),
        _col("cancelled_time", UTCTimestamp(), True),
        _col("version", sa.Integer()),
        _col("response_required", sa.Integer()),
        _col("extra", sa.JSON(), True),
        *_limits(),
        _fk("sep_controls", "edev_id", "sep_end_devices"),
        _fk("sep_controls", "program_id", "sep_programs"),
        _pk("sep_controls", "control_id"),
        _unique_mrid("sep_controls"),
    )
    with op.batch_alter_table("sep_controls", schema=None) as batch_op:
        batch_op.create_index("ix_sep_controls_program_id", ["program_id"], unique=False)
    op.create_table(
        "sep_default_controls",
        _id("program_id"),
        _col("mrid", MRID),
        _col("description", sa.Text()),
        _col("version", sa.Integer()),
        _col("set_grad_w", sa.Integer(), True),
        *_limits(),
        _fk("sep_default_controls", "program_id", "sep_programs"),
        _pk("sep_default_controls", "program_id"),
    )
    op.create_table(
        "sep_der_documents",
        _id("edev_id"),
        _col("kind", sa.String(length=32)),
        _col("xml", sa.LargeBinary()),
        _col("received_time", UTCTimestamp()),
        _fk("sep_der_documents", "edev_id", "sep_end_devices"),
        _pk("sep_der_documents", "edev_id", "kind"),
    )
    op.create_table(
        "sep_responses",
        _id("response_id"),
        _col("control_id", sa.Integer()),
        _col("mrid", MRID),
        _col("edev_id", sa.Integer()),
        _col("lfdi", LFDI),
        _col("status", sa.Integer(), True),
        _col("created_time", UTCTimestamp(), True),
        _col("received_time", UTCTimestamp()),
        _fk("sep_responses", "control_id", "sep_controls"),
        _fk("sep_responses", "edev_id", "sep_end_devices"),
        _pk("sep_responses", "response_id"),
        sa.UniqueConstraint("control_id", "edev_id", "status",
                            name="uq_sep_responses_control_edev_status"),
    )
    op.create_table(
        "sep_mirror_usage_points",
        _id("mup_id"),
        _col("mrid", MRID),
        _col("edev_id", sa.Integer()),
        _col("device_lfdi", LFDI),
        _col("creator_lfdi", LFDI),
        _col("role_flags", sa.Integer()),
        _col("service_category_kind", sa.Integer()),
        _col("status", sa.Integer()),
        _col("description", sa.Text()),
        _col("post_rate_s", sa.BigInteger(), True),
        _col("created_time", UTCTimestamp(), True),
        _fk("sep_mirror_usage_points", "edev_id", "sep_end_devices"),
        _pk("sep_mirror_usage_points", "mup_id"),
        _unique_mrid("sep_mirror_usage_points"),
    )
    op.create_table(
        "sep_mirror_readings",
        _id("mup_id"),
        _id("position"),
        _col("mrid", MRID),
        _col("description", sa.Text()),
        _col("uom", sa.Integer(), True),
        _col("power_of_ten_multiplier", sa.Integer()),
        _col("flow_direction", sa.Integer()),
        _col("phase", sa.Integer()),
        _col("kind", sa.Integer(), True),
        _col("accumulation_behaviour", sa.Integer(), True),
        _col("data_qualifier", sa.Integer(), True),
        _col("xml", sa.LargeBinary()),
        _fk("sep_mirror_readings", "mup_id", "sep_mirror_usage_points"),
        _pk("sep_mirror_readings", "mup_id", "position"),
        sa.UniqueConstraint("mup_id", "mrid", name="uq_sep_mirror_readings_mup_mrid"),
    )
    op.create_table(
        "sep_log_events",
        _id("log_event_id"),
        _col("edev_id", sa.Integer()),
        _col("created_time", UTCTimestamp()),
        _col("function_set", sa.Integer()),
        _col("log_event_code", sa.Integer()),
        _col("device_log_event_id", sa.BigInteger()),
        _col("log_event_pen", sa.BigInteger()),
        _col("profile_id", sa.Integer()),
        _col("details", sa.Text(), True),
        _col("extended_data", sa.BigInteger(), True),
        _col("received_time", UTCTimestamp(), True),
        _fk("sep_log_events", "edev_id", "sep_end_devices"),
        _pk("sep_log_events", "log_event_id"),
    )
    with op.batch_alter_table("sep_log_events", schema=None) as batch_op:
        batch_op.create_index("ix_sep_log_events_edev_id", ["edev_id", "log_event_id"],
                              unique=False)
    op.create_table(
        "sep_subscriptions",
        _id("subscription_id"),
        _col("edev_id", sa.Integer()),
        _col("owner_lfdi", LFDI),
        _col("subscribed_resource", sa.Text()),
        _col("notification_uri", sa.Text()),
        _col("item_limit", sa.BigInteger()),
        _col("level", sa.String(length=16)),
        _col("encoding", sa.Integer()),
        _col("created_time", UTCTimestamp(), True),
        _fk("sep_subscriptions", "edev_id", "sep_end_devices"),
        _pk("sep_subscriptions", "subscription_id"),
    )


def downgrade() -> None:
    op.drop_table("sep_subscriptions")
    with op.batch_alter_table("sep_log_events", schema=None) as batch_op:
        batch_op.drop_index("ix_sep_log_events_edev_id")
    op.drop_table("sep_log_events")
    op.drop_table("sep_mirror_readings")
    op.drop_table("sep_mirror_usage_points")
    op.drop_table("sep_responses")
    op.drop_table("sep_der_documents")
    op.drop_table("sep_default_controls")
    with op.batch_alter_table("sep_controls", schema=None) as batch_op:
        batch_op.drop_index("ix_sep_controls_program_id")
    op.drop_table("sep_controls")
    op.drop_table("sep_curves")
    op.drop_table("sep_fsas")
    op.drop_table("sep_programs")
    op.drop_table("sep_end_devices")
    op.drop_table("sep_aggregators")
    op.drop_table("sep_counters")
