"""control commands: the control loop's device commands and what became of them

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from derms.store.types import UTCTimestamp

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_STATES = ("issued", "sent", "acknowledged", "delivered", "not_delivered", "superseded",
           "expired")
_MODES = ("p_setpoint", "export_limit", "import_limit")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "control_commands",
        sa.Column("command_id", sa.String(length=64), nullable=False),
        sa.Column("der_id", sa.String(length=64), nullable=False),
        sa.Column("feeder_id", sa.String(length=64), nullable=False),
        sa.Column("cycle_id", sa.String(length=200), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("p_kw", sa.Float(), nullable=False),
        sa.Column("q_kvar", sa.Float(), nullable=True),
        sa.Column("valid_from", UTCTimestamp(), nullable=False),
        sa.Column("valid_until", UTCTimestamp(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("issued_at", UTCTimestamp(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("sent_at", UTCTimestamp(), nullable=True),
        sa.Column("acknowledged_at", UTCTimestamp(), nullable=True),
        sa.Column("ack_status", sa.SmallInteger(), nullable=True),
        sa.Column("verified_at", UTCTimestamp(), nullable=True),
        sa.Column("measured_p_kw", sa.Float(), nullable=True),
        sa.Column("measured_at", UTCTimestamp(), nullable=True),
        sa.Column("superseded_by", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", UTCTimestamp(), nullable=False),
        sa.CheckConstraint(_in("state", _STATES), name=op.f("ck_control_commands_state_known")),
        sa.CheckConstraint(_in("mode", _MODES), name=op.f("ck_control_commands_mode_known")),
        sa.CheckConstraint("valid_until > valid_from",
                           name=op.f("ck_control_commands_valid_after_from")),
        sa.PrimaryKeyConstraint("command_id", name=op.f("pk_control_commands")),
    )
    with op.batch_alter_table("control_commands", schema=None) as batch_op:
        batch_op.create_index("ix_control_commands_der_issued", ["der_id", "issued_at"],
                              unique=False)
        batch_op.create_index("ix_control_commands_state_until", ["state", "valid_until"],
                              unique=False)
        batch_op.create_index("ix_control_commands_feeder_issued", ["feeder_id", "issued_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("control_commands", schema=None) as batch_op:
        batch_op.drop_index("ix_control_commands_feeder_issued")
        batch_op.drop_index("ix_control_commands_state_until")
        batch_op.drop_index("ix_control_commands_der_issued")
    op.drop_table("control_commands")
