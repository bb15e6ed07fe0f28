"""sign-in and roles: who queued a run or saved a preset, role grants, an append-only audit

``runs.created_by`` and ``aug_presets.created_by`` hold the identity that queued / saved
(NULL for rows from before sign-in). ``user_roles`` holds the roles admins grant.
``audit_events`` records every gated action; triggers refuse UPDATE and DELETE on it, on
SQLite and PostgreSQL alike, so the log is append-only below the application too.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 00:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

MESSAGE = 'audit_events is append-only'


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_by', sa.String(length=200), nullable=True))
        batch_op.create_index(batch_op.f('ix_runs_created_by'), ['created_by'], unique=False)
    with op.batch_alter_table('aug_presets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_by', sa.String(length=200), nullable=True))
    op.create_table(
        'audit_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.String(length=200), nullable=False),
        sa.Column('source', sa.String(length=10), nullable=False),
        sa.Column('action', sa.String(length=50), nullable=False),
        sa.Column('target', sa.Text(), nullable=False),
        sa.Column('outcome', sa.String(length=10), nullable=False),
        sa.Column('detail_json', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events')))
    op.create_index('ix_audit_events_actor', 'audit_events', ['actor', 'id'], unique=False)
    op.create_index('ix_audit_events_action', 'audit_events', ['action', 'id'], unique=False)
    op.create_table(
        'user_roles',
        sa.Column('identity', sa.String(length=200), nullable=False),
        sa.Column('roles', sa.String(length=200), nullable=False),
        sa.Column('granted_by', sa.String(length=200), nullable=False),
        sa.Column('granted_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('identity', name=op.f('pk_user_roles')))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$ BEGIN "
                   f"RAISE EXCEPTION '{MESSAGE}'; END; $$ LANGUAGE plpgsql")
        for event in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER audit_events_no_{event.lower()} BEFORE {event} ON "
                       "audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()")
    else:
        for event in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER audit_events_no_{event.lower()} BEFORE {event} ON "
                       f"audit_events BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END")


def downgrade() -> None:
    for event in ('update', 'delete'):
        op.execute(f"DROP TRIGGER IF EXISTS audit_events_no_{event}"
                   + (" ON audit_events" if op.get_bind().dialect.name == 'postgresql' else ""))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
    op.drop_table('user_roles')
    op.drop_index('ix_audit_events_action', table_name='audit_events')
    op.drop_index('ix_audit_events_actor', table_name='audit_events')
    op.drop_table('audit_events')
    with op.batch_alter_table('aug_presets', schema=None) as batch_op:
        batch_op.drop_column('created_by')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_created_by'))
        batch_op.drop_column('created_by')
