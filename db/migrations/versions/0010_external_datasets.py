"""external datasets: a dataset flagged as another site or period

``datasets.external`` marks a dataset as external validation data (another site or acquisition
period). A model's external figures (its card's ``measured`` entries with role ``external``) are
computed on such datasets only, on images the model never trained, selected or calibrated on.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 04:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite too): a batch copy of ``datasets`` would drop the old table,
    # which the images' foreign keys forbid.
    op.add_column('datasets', sa.Column('external', sa.Boolean(), nullable=False,
                                        server_default=sa.false()))


def downgrade() -> None:
    op.execute('ALTER TABLE datasets DROP COLUMN external')
