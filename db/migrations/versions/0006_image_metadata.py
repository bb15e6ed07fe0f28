"""image metadata from a dataset's metadata CSV: site, sex, age, view

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 18:50:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('site', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('sex', sa.String(length=1), nullable=True))
        batch_op.add_column(sa.Column('age_years', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('view', sa.String(length=100), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 too): a batch copy of ``images`` would
    # drop the old table, which the relabels' foreign keys forbid.
    for column in ('view', 'age_years', 'sex', 'site'):
        op.execute(f'ALTER TABLE images DROP COLUMN {column}')
