"""control commands: the "release" mode (a block ends the DERMS's own command)

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_OLD = ("p_setpoint", "export_limit", "import_limit")
_NEW = (*_OLD, "release")
_NAME = "ck_control_commands_mode_known"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _modes(values: tuple[str, ...]) -> None:
    with op.batch_alter_table("control_commands") as batch:
        batch.drop_constraint(op.f(_NAME), type_="check")
        batch.create_check_constraint(op.f(_NAME), _in("mode", values))


def upgrade() -> None:
    _modes(_NEW)


def downgrade() -> None:
    op.execute("DELETE FROM control_commands WHERE mode = 'release'")
    _modes(_OLD)
