"""envelopes: stored operating-envelope sets and their values

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from derms.store.types import UTCTimestamp

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "envelope_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("feeder", sa.String(length=200), nullable=False),
        sa.Column("policy", sa.String(length=16), nullable=False),
        sa.Column("start", UTCTimestamp(), nullable=False),
        sa.Column("step_s", sa.Integer(), nullable=False),
        sa.Column("n_intervals", sa.Integer(), nullable=False),
        sa.Column("n_connection_points", sa.Integer(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCTimestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_envelope_sets")),
    )
    with op.batch_alter_table("envelope_sets", schema=None) as batch_op:
        batch_op.create_index("ix_envelope_sets_feeder_start", ["feeder", "start"], unique=False)
    # no foreign key to envelope_sets (as forecast_values): values are written in bulk with
    # the id just inserted and deleted with their set (derms.store.envelopes)
    op.create_table(
        "envelope_values",
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("connection_point", sa.String(length=200), nullable=False),
        sa.Column("t", UTCTimestamp(), nullable=False),
        sa.Column("export_limit_kw", sa.Float(), nullable=True),
        sa.Column("import_limit_kw", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("set_id", "connection_point", "t",
                                name=op.f("pk_envelope_values")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("envelope_values")
    with op.batch_alter_table("envelope_sets", schema=None) as batch_op:
        batch_op.drop_index("ix_envelope_sets_feeder_start")
    op.drop_table("envelope_sets")
