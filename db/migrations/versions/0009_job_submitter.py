"""who asked for a job: the per-user cap on queued view jobs

``jobs.created_by`` holds the identity that submitted a job through ``cxr_core.actions`` (NULL
for jobs from before 0009 and for those the app queues itself, such as the CXR_DATA_DIR index
jobs at start). ``CXR_MAX_QUEUED_VIEW_JOBS`` counts one identity's queued and running view jobs
by it (the index on (created_by, status)).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 12:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_by', sa.String(length=200), nullable=True))
        batch_op.create_index('ix_jobs_created_by_status', ['created_by', 'status'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_created_by_status')
        batch_op.drop_column('created_by')
