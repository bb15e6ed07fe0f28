"""job and run parents: per-user caps count a parent's children once

``jobs.parent`` and ``runs.parent`` name what a job or run belongs to (``"audit:7"``, the folds
of an audit; ``"study:3"``, the trials of a search; ``"job:12"``), NULL for everything else.
Per-user caps (``CXR_MAX_QUEUED_JOBS_PER_USER``, ``CXR_MAX_QUEUED_VIEW_JOBS``,
``CXR_MAX_ACTIVE_RUNS_PER_USER``) count one unit per open row without a parent plus one per
distinct parent; a child is never refused by a cap (its parent was admitted once).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 09:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent', sa.String(length=100), nullable=True))
        batch_op.create_index('ix_jobs_parent', ['parent'], unique=False)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent', sa.String(length=100), nullable=True))
        batch_op.create_index('ix_runs_parent', ['parent'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_parent')
        batch_op.drop_column('parent')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_parent')
        batch_op.drop_column('parent')
