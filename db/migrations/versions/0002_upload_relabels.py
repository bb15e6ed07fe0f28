"""relabels of uploads: relabels.image_id nullable, relabels.upload_sha256

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite cannot ALTER a column's nullability, so the table is recreated
    # (existing rows are copied over unchanged).
    with op.batch_alter_table('relabels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('upload_sha256', sa.String(length=64), nullable=True))
        batch_op.alter_column('image_id', existing_type=sa.Integer(), nullable=True)
        batch_op.create_index(batch_op.f('ix_relabels_upload_sha256'), ['upload_sha256'],
                              unique=False)
        batch_op.create_check_constraint(
            'one_target', '(image_id IS NULL) <> (upload_sha256 IS NULL)')


def downgrade() -> None:
    # Upload relabels cannot exist without upload_sha256: they are dropped (undo rows first,
    # because of the undo_of foreign key).
    op.execute("DELETE FROM relabels WHERE upload_sha256 IS NOT NULL AND undo_of IS NOT NULL")
    op.execute("DELETE FROM relabels WHERE upload_sha256 IS NOT NULL")
    with op.batch_alter_table('relabels', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_relabels_one_target'), type_='check')
        batch_op.drop_index(batch_op.f('ix_relabels_upload_sha256'))
        batch_op.alter_column('image_id', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column('upload_sha256')
