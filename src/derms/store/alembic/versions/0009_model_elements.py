"""feeder model versions: the model's buses (with their nodes) and transformers, stored
at registration so that device and meter buses are checked without compiling the model

Revision ID: 0009
Revises: 0008
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feeder_model_versions") as batch:
        batch.add_column(sa.Column("elements", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("feeder_model_versions") as batch:
        batch.drop_column("elements")
