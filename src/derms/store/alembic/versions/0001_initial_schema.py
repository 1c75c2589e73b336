"""initial schema: every table of the store, and the audit log's append-only guard

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 18:40:41.125571
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from derms.store.types import UTCTimestamp

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

# The audit log is append-only: the database itself refuses UPDATE, DELETE (and TRUNCATE).
_PG_GUARD = """
CREATE FUNCTION derms_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$
"""
_PG_TRIGGERS = [
    ("CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log "
     "FOR EACH ROW EXECUTE FUNCTION derms_audit_log_append_only()"),
    ("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
     "FOR EACH STATEMENT EXECUTE FUNCTION derms_audit_log_append_only()"),
]
_SQLITE_TRIGGERS = [
    ("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
     "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only (UPDATE refused)'); END"),
    ("CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
     "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only (DELETE refused)'); END"),
]


def _create_audit_guard() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_GUARD)
        for sql in _PG_TRIGGERS:
            op.execute(sql)
    else:
        for sql in _SQLITE_TRIGGERS:
            op.execute(sql)


def _drop_audit_guard() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update_delete ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS derms_audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('t', UTCTimestamp(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('entity', sa.String(length=64), nullable=False),
    sa.Column('entity_id', sa.String(length=200), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_log_entity', ['entity', 'entity_id'], unique=False)
        batch_op.create_index('ix_audit_log_t', ['t'], unique=False)

    op.create_table('feeders',
    sa.Column('feeder_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('substation', sa.String(length=64), nullable=True),
    sa.Column('created_at', UTCTimestamp(), nullable=False),
    sa.PrimaryKeyConstraint('feeder_id', name=op.f('pk_feeders'))
    )
    op.create_table('der_groups',
    sa.Column('group_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.Enum('feeder', 'transformer', 'phase', 'program', name='kind', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('feeder_id', sa.String(length=64), nullable=True),
    sa.Column('description', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['feeder_id'], ['feeders.feeder_id'], name=op.f('fk_der_groups_feeder_id_feeders')),
    sa.PrimaryKeyConstraint('group_id', name=op.f('pk_der_groups')),
    sa.UniqueConstraint('kind', 'key', 'feeder_id', name=op.f('uq_der_groups_kind'))
    )
    op.create_table('der_sites',
    sa.Column('site_id', sa.String(length=64), nullable=False),
    sa.Column('feeder_id', sa.String(length=64), nullable=True),
    sa.Column('bus', sa.String(length=64), nullable=True),
    sa.Column('service_transformer', sa.String(length=64), nullable=True),
    sa.Column('owner', sa.String(length=200), nullable=True),
    sa.Column('created_at', UTCTimestamp(), nullable=False),
    sa.ForeignKeyConstraint(['feeder_id'], ['feeders.feeder_id'], name=op.f('fk_der_sites_feeder_id_feeders')),
    sa.PrimaryKeyConstraint('site_id', name=op.f('pk_der_sites'))
    )
    with op.batch_alter_table('der_sites', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_der_sites_feeder_id'), ['feeder_id'], unique=False)

    op.create_table('feeder_model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('feeder_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('source_format', sa.String(length=32), nullable=False),
    sa.Column('source_uri', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('valid_from', UTCTimestamp(), nullable=False),
    sa.Column('created_at', UTCTimestamp(), nullable=False),
    sa.ForeignKeyConstraint(['feeder_id'], ['feeders.feeder_id'], name=op.f('fk_feeder_model_versions_feeder_id_feeders'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feeder_model_versions')),
    sa.UniqueConstraint('feeder_id', 'version', name=op.f('uq_feeder_model_versions_feeder_id'))
    )
    op.create_table('topology_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('feeder_id', sa.String(length=64), nullable=False),
    sa.Column('switch', sa.String(length=64), nullable=False),
    sa.Column('state', sa.Enum('open', 'closed', name='state', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('t', UTCTimestamp(), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['feeder_id'], ['feeders.feeder_id'], name=op.f('fk_topology_events_feeder_id_feeders')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_topology_events'))
    )
    with op.batch_alter_table('topology_events', schema=None) as batch_op:
        batch_op.create_index('ix_topology_events_feeder_t', ['feeder_id', 't'], unique=False)

    op.create_table('der_devices',
    sa.Column('der_id', sa.String(length=64), nullable=False),
    sa.Column('site_id', sa.String(length=64), nullable=False),
    sa.Column('der_type', sa.Enum('pv', 'battery', 'ev_charger', 'wind', 'generator', 'flexible_load', 'other', name='der_type', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('p_gen_max_kw', sa.Float(), nullable=False),
    sa.Column('p_charge_max_kw', sa.Float(), nullable=False),
    sa.Column('s_max_kva', sa.Float(), nullable=False),
    sa.Column('e_max_kwh', sa.Float(), nullable=True),
    sa.Column('q_max_kvar', sa.Float(), nullable=False),
    sa.Column('q_min_kvar', sa.Float(), nullable=False),
    sa.Column('phase', sa.Enum('a', 'b', 'c', 'ab', 'bc', 'ca', 'abc', name='phase', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('bus', sa.String(length=64), nullable=True),
    sa.Column('service_transformer', sa.String(length=64), nullable=True),
    sa.Column('owner', sa.String(length=200), nullable=True),
    sa.Column('aggregator', sa.String(length=200), nullable=True),
    sa.Column('protocol', sa.Enum('ieee2030_5', 'openadr3', 'sunspec', 'mqtt', 'none', name='protocol', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('endpoint', sa.String(length=500), nullable=True),
    sa.Column('status', sa.Enum('commissioning', 'active', 'inactive', 'fault', 'decommissioned', name='status', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('created_at', UTCTimestamp(), nullable=False),
    sa.CheckConstraint('e_max_kwh IS NULL OR e_max_kwh >= 0', name=op.f('ck_der_devices_e_max_kwh_nonneg')),
    sa.CheckConstraint('p_charge_max_kw >= 0', name=op.f('ck_der_devices_p_charge_max_kw_nonneg')),
    sa.CheckConstraint('p_gen_max_kw >= 0', name=op.f('ck_der_devices_p_gen_max_kw_nonneg')),
    sa.CheckConstraint('q_max_kvar >= 0 AND q_min_kvar <= 0', name=op.f('ck_der_devices_q_limits_sign')),
    sa.CheckConstraint('s_max_kva > 0', name=op.f('ck_der_devices_s_max_kva_pos')),
    sa.ForeignKeyConstraint(['site_id'], ['der_sites.site_id'], name=op.f('fk_der_devices_site_id_der_sites')),
    sa.PrimaryKeyConstraint('der_id', name=op.f('pk_der_devices'))
    )
    with op.batch_alter_table('der_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_der_devices_aggregator'), ['aggregator'], unique=False)
        batch_op.create_index(batch_op.f('ix_der_devices_service_transformer'), ['service_transformer'], unique=False)
        batch_op.create_index(batch_op.f('ix_der_devices_site_id'), ['site_id'], unique=False)

    op.create_table('meters',
    sa.Column('meter_id', sa.String(length=64), nullable=False),
    sa.Column('site_id', sa.String(length=64), nullable=True),
    sa.Column('feeder_id', sa.String(length=64), nullable=True),
    sa.Column('bus', sa.String(length=64), nullable=True),
    sa.Column('service_transformer', sa.String(length=64), nullable=True),
    sa.Column('phase', sa.Enum('a', 'b', 'c', 'ab', 'bc', 'ca', 'abc', name='phase', native_enum=False, create_constraint=True, length=24), nullable=True),
    sa.Column('created_at', UTCTimestamp(), nullable=False),
    sa.ForeignKeyConstraint(['feeder_id'], ['feeders.feeder_id'], name=op.f('fk_meters_feeder_id_feeders')),
    sa.ForeignKeyConstraint(['site_id'], ['der_sites.site_id'], name=op.f('fk_meters_site_id_der_sites')),
    sa.PrimaryKeyConstraint('meter_id', name=op.f('pk_meters'))
    )
    with op.batch_alter_table('meters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_meters_feeder_id'), ['feeder_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_meters_site_id'), ['site_id'], unique=False)

    op.create_table('alarms',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('severity', sa.Enum('info', 'warning', 'critical', name='severity', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('feeder_id', sa.String(length=64), nullable=True),
    sa.Column('der_id', sa.String(length=64), nullable=True),
    sa.Column('meter_id', sa.String(length=64), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('t_raised', UTCTimestamp(), nullable=False),
    sa.Column('t_cleared', UTCTimestamp(), nullable=True),
    sa.Column('t_acked', UTCTimestamp(), nullable=True),
    sa.Column('acked_by', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['der_id'], ['der_devices.der_id'], name=op.f('fk_alarms_der_id_der_devices')),
    sa.ForeignKeyConstraint(['feeder_id'], ['feeders.feeder_id'], name=op.f('fk_alarms_feeder_id_feeders')),
    sa.ForeignKeyConstraint(['meter_id'], ['meters.meter_id'], name=op.f('fk_alarms_meter_id_meters')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alarms'))
    )
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        batch_op.create_index('ix_alarms_t_raised', ['t_raised'], unique=False)

    op.create_table('der_group_members',
    sa.Column('group_id', sa.String(length=64), nullable=False),
    sa.Column('der_id', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['der_id'], ['der_devices.der_id'], name=op.f('fk_der_group_members_der_id_der_devices'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['group_id'], ['der_groups.group_id'], name=op.f('fk_der_group_members_group_id_der_groups'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('group_id', 'der_id', name=op.f('pk_der_group_members'))
    )
    with op.batch_alter_table('der_group_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_der_group_members_der_id'), ['der_id'], unique=False)

    op.create_table('series',
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('der_id', sa.String(length=64), nullable=True),
    sa.Column('meter_id', sa.String(length=64), nullable=True),
    sa.Column('quantity', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.CheckConstraint('(der_id IS NULL) <> (meter_id IS NULL)', name=op.f('ck_series_one_owner')),
    sa.ForeignKeyConstraint(['der_id'], ['der_devices.der_id'], name=op.f('fk_series_der_id_der_devices')),
    sa.ForeignKeyConstraint(['meter_id'], ['meters.meter_id'], name=op.f('fk_series_meter_id_meters')),
    sa.PrimaryKeyConstraint('series_id', name=op.f('pk_series'))
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index('uq_series_device', ['der_id', 'quantity', 'source'], unique=True, sqlite_where=sa.text('der_id IS NOT NULL'), postgresql_where=sa.text('der_id IS NOT NULL'))
        batch_op.create_index('uq_series_meter', ['meter_id', 'quantity', 'source'], unique=True, sqlite_where=sa.text('meter_id IS NOT NULL'), postgresql_where=sa.text('meter_id IS NOT NULL'))

    op.create_table('readings',
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('t', UTCTimestamp(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('quality', sa.SmallInteger(), nullable=False),
    sa.PrimaryKeyConstraint('series_id', 't', name=op.f('pk_readings')),
    sqlite_with_rowid=False
    )
    _create_audit_guard()


def downgrade() -> None:
    _drop_audit_guard()
    op.drop_table('readings')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index('uq_series_meter', sqlite_where=sa.text('meter_id IS NOT NULL'), postgresql_where=sa.text('meter_id IS NOT NULL'))
        batch_op.drop_index('uq_series_device', sqlite_where=sa.text('der_id IS NOT NULL'), postgresql_where=sa.text('der_id IS NOT NULL'))

    op.drop_table('series')
    with op.batch_alter_table('der_group_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_der_group_members_der_id'))

    op.drop_table('der_group_members')
    with op.batch_alter_table('alarms', schema=None) as batch_op:
        batch_op.drop_index('ix_alarms_t_raised')

    op.drop_table('alarms')
    with op.batch_alter_table('meters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_meters_site_id'))
        batch_op.drop_index(batch_op.f('ix_meters_feeder_id'))

    op.drop_table('meters')
    with op.batch_alter_table('der_devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_der_devices_site_id'))
        batch_op.drop_index(batch_op.f('ix_der_devices_service_transformer'))
        batch_op.drop_index(batch_op.f('ix_der_devices_aggregator'))

    op.drop_table('der_devices')
    with op.batch_alter_table('topology_events', schema=None) as batch_op:
        batch_op.drop_index('ix_topology_events_feeder_t')

    op.drop_table('topology_events')
    op.drop_table('feeder_model_versions')
    with op.batch_alter_table('der_sites', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_der_sites_feeder_id'))

    op.drop_table('der_sites')
    op.drop_table('der_groups')
    op.drop_table('feeders')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_log_t')
        batch_op.drop_index('ix_audit_log_entity')

    op.drop_table('audit_log')
