"""topology events: one row per report (feeder, switch, time, state, source), unique

Two identical ADMS switching reports stored at once had both been inserted. Duplicates
already stored are deleted first, keeping the earliest (lowest id) of each.

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_NAME = "uq_topology_events_report"
_KEY = ("feeder_id", "switch", "t", "state", "source")


def _delete_later_duplicates() -> None:
    same = " AND ".join(f"earlier.{c} = topology_events.{c}" for c in _KEY)
    op.execute("DELETE FROM topology_events WHERE EXISTS (SELECT 1 FROM topology_events "
               f"AS earlier WHERE {same} AND earlier.id < topology_events.id)")


def upgrade() -> None:
    _delete_later_duplicates()
    op.create_index(_NAME, "topology_events", list(_KEY), unique=True)


def downgrade() -> None:
    op.drop_index(_NAME, table_name="topology_events")
