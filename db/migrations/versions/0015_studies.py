"""hyperparameter studies: a studies table, and trial runs linked to their study

``studies`` holds what the app knows of a study (name, owner, config, where its Optuna study
lives, how many trials were asked); the Optuna study itself lives in its own store, never in
this database (Optuna keeps its own ``alembic_version`` table). ``runs.study_id`` and
``runs.trial_number`` mark a run as a study's trial: the study is its parent, so per-user caps
can count a study once.

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-07 05:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0015'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'studies',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('config_json', sa.Text(), nullable=False),
        sa.Column('optuna_study', sa.String(length=300), nullable=False),
        sa.Column('optuna_url', sa.Text(), nullable=False),
        sa.Column('trials_queued', sa.Integer(), nullable=False),
        sa.Column('best_run_id', sa.Integer(), nullable=True),
        sa.Column('best_value', sa.Float(), nullable=True),
        sa.Column('promoted_run_id', sa.Integer(), nullable=True),
        sa.Column('created_by', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('note', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_studies')),
        sa.UniqueConstraint('name', name=op.f('uq_studies_name')),
    )
    op.create_index(op.f('ix_studies_created_by'), 'studies', ['created_by'])
    # Plain ADD COLUMNs (SQLite too): a batch copy of ``runs`` would drop the old table, which
    # the metrics' and logs' foreign keys forbid.
    op.add_column('runs', sa.Column('study_id', sa.Integer(), nullable=True))
    op.add_column('runs', sa.Column('trial_number', sa.Integer(), nullable=True))
    op.create_index(op.f('ix_runs_study_id'), 'runs', ['study_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_runs_study_id'), table_name='runs')
    op.execute('ALTER TABLE runs DROP COLUMN trial_number')
    op.execute('ALTER TABLE runs DROP COLUMN study_id')
    op.drop_index(op.f('ix_studies_created_by'), table_name='studies')
    op.drop_table('studies')
