"""forecasts: trained models, forecast runs and their quantile values

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from derms.store.types import UTCTimestamp

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "forecast_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("trained_at", UTCTimestamp(), nullable=False),
        sa.Column("train_end", UTCTimestamp(), nullable=False),
        sa.Column("n_series", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCTimestamp(), nullable=False),
        sa.CheckConstraint("kind IN ('load', 'pv')", name=op.f("ck_forecast_models_kind_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forecast_models")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_forecast_models_name")),
    )
    with op.batch_alter_table("forecast_models", schema=None) as batch_op:
        batch_op.create_index("ix_forecast_models_name_trained_at", ["name", "trained_at"],
                              unique=False)

    op.create_table(
        "forecast_runs",
        sa.Column("id", _BIGINT, nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("issued_at", UTCTimestamp(), nullable=False),
        sa.Column("horizon_s", sa.Integer(), nullable=False),
        sa.Column("step_s", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCTimestamp(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["forecast_models.id"],
                                name=op.f("fk_forecast_runs_model_id_forecast_models")),
        sa.ForeignKeyConstraint(["series_id"], ["series.series_id"],
                                name=op.f("fk_forecast_runs_series_id_series")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forecast_runs")),
    )
    with op.batch_alter_table("forecast_runs", schema=None) as batch_op:
        batch_op.create_index("ix_forecast_runs_series_issued", ["series_id", "issued_at"],
                              unique=False)
        batch_op.create_index("ix_forecast_runs_model_id", ["model_id"], unique=False)

    # no foreign key to forecast_runs: checked row by row it makes COPY 4x slower (models.py)
    op.create_table(
        "forecast_values",
        sa.Column("run_id", _BIGINT, nullable=False),
        sa.Column("t", UTCTimestamp(), nullable=False),
        sa.Column("p10", sa.Float(), nullable=False),
        sa.Column("p50", sa.Float(), nullable=False),
        sa.Column("p90", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "t", name=op.f("pk_forecast_values")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("forecast_values")
    with op.batch_alter_table("forecast_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_forecast_runs_model_id")
        batch_op.drop_index("ix_forecast_runs_series_issued")
    op.drop_table("forecast_runs")
    with op.batch_alter_table("forecast_models", schema=None) as batch_op:
        batch_op.drop_index("ix_forecast_models_name_trained_at")
    op.drop_table("forecast_models")
