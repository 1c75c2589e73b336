"""control requests: safety, ADMS, operator and optimisation requests of the arbiter

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from derms.store.types import UTCTimestamp

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_SOURCES = ("safety", "adms", "operator", "optimisation")
_KINDS = ("block_dispatch", "limit_export", "limit_import", "abnormal_configuration",
          "operator_setpoint", "optimisation_setpoint")  # no switch/regulator/capacitor kind
_SCOPES = ("feeder", "section", "connection_point", "device")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "control_requests",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("scope_kind", sa.String(length=24), nullable=False),
        sa.Column("feeder_id", sa.String(length=200), nullable=True),
        sa.Column("section_id", sa.String(length=200), nullable=True),
        sa.Column("buses", sa.JSON(), nullable=True),
        sa.Column("connection_point", sa.String(length=200), nullable=True),
        sa.Column("der_id", sa.String(length=200), nullable=True),
        sa.Column("value_kw", sa.Float(), nullable=True),
        sa.Column("start", UTCTimestamp(), nullable=False),
        sa.Column("expiry", UTCTimestamp(), nullable=False),
        sa.Column("issued_at", UTCTimestamp(), nullable=False),
        sa.Column("withdrawn_at", UTCTimestamp(), nullable=True),
        sa.Column("ended_at", UTCTimestamp(), nullable=True),
        sa.Column("end_reason", sa.String(length=16), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", UTCTimestamp(), nullable=False),
        sa.CheckConstraint(_in("source", _SOURCES), name=op.f("ck_control_requests_source_known")),
        sa.CheckConstraint(_in("kind", _KINDS), name=op.f("ck_control_requests_kind_known")),
        sa.CheckConstraint(_in("scope_kind", _SCOPES),
                           name=op.f("ck_control_requests_scope_kind_known")),
        sa.CheckConstraint("expiry > start", name=op.f("ck_control_requests_expiry_after_start")),
        sa.CheckConstraint("kind NOT IN ('limit_export', 'limit_import') OR value_kw >= 0",
                           name=op.f("ck_control_requests_limit_nonneg")),
        sa.CheckConstraint("end_reason IS NULL OR end_reason IN ('expired', 'withdrawn')",
                           name=op.f("ck_control_requests_end_reason_known")),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_control_requests")),
    )
    with op.batch_alter_table("control_requests", schema=None) as batch_op:
        batch_op.create_index("ix_control_requests_open", ["ended_at", "expiry"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("control_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_control_requests_open")
    op.drop_table("control_requests")
