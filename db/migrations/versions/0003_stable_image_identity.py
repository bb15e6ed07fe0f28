"""stable image identity and label provenance

- images: ``missing``/``missing_since`` (a file gone from disk keeps its row),
  ``previous_sha256``/``content_changed_at`` (bytes changed: the row and its relabels stay),
  ``acquired_date``.
- relabels, review_items: ``image_id`` loses ON DELETE CASCADE (nothing can remove a relabel
  by removing an image row); relabels gain ``image_sha256`` (the bytes that were reviewed),
  back-filled from the image's current hash.
- evaluations: the labels they were scored against (``label_source``, snapshot hash, newest
  relabel id) and the overlap with the evaluated run's own images.
- run_images: the images each run trained and selected on.

Every existing row is carried over: columns are only added, and the two tables whose foreign
key changes are copied whole by Alembic's batch mode (``images`` itself is never recreated, so
SQLite's implicit DELETE of a dropped parent table cannot cascade into anything; and
``db.engine.upgrade`` runs SQLite migrations with foreign keys off, checked before commit).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 22:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('acquired_date', sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column('missing', sa.Boolean(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('missing_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('previous_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('content_changed_at', sa.DateTime(timezone=True),
                                      nullable=True))

    with op.batch_alter_table('relabels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('image_sha256', sa.String(length=64), nullable=True))
        batch_op.drop_constraint('fk_relabels_image_id_images', type_='foreignkey')
        batch_op.create_foreign_key('fk_relabels_image_id_images', 'images', ['image_id'], ['id'])
    op.execute("UPDATE relabels SET image_sha256 = (SELECT images.sha256 FROM images "
               "WHERE images.id = relabels.image_id) WHERE image_id IS NOT NULL")

    with op.batch_alter_table('review_items', schema=None) as batch_op:
        batch_op.drop_constraint('fk_review_items_image_id_images', type_='foreignkey')
        batch_op.create_foreign_key('fk_review_items_image_id_images', 'images', ['image_id'],
                                    ['id'])

    with op.batch_alter_table('evaluations', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('label_source', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('label_scheme', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('label_snapshot_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('label_snapshot_relabel_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('overlap_json', sa.Text(), nullable=True))

    op.create_table(
        'run_images',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('role', sa.String(length=10), nullable=False),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'],
                                name=op.f('fk_run_images_image_id_images')),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_images_run_id_runs'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_run_images')),
        sa.UniqueConstraint('run_id', 'image_id', name=op.f('uq_run_images_run_id')))
    with op.batch_alter_table('run_images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_run_images_image_id'), ['image_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_run_images_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    # images first, and without recreating it (plain DROP COLUMN, SQLite >= 3.35): a
    # recreated parent table would SET NULL every eval_predictions.image_id on the way.
    for col in ('content_changed_at', 'previous_sha256', 'missing_since', 'missing',
                'acquired_date'):
        op.execute(f"ALTER TABLE images DROP COLUMN {col}")
    op.drop_table('run_images')
    for col in ('overlap_json', 'label_snapshot_relabel_id', 'label_snapshot_hash',
                'label_scheme', 'label_source'):
        op.execute(f"ALTER TABLE evaluations DROP COLUMN {col}")
    with op.batch_alter_table('review_items', schema=None) as batch_op:
        batch_op.drop_constraint('fk_review_items_image_id_images', type_='foreignkey')
        batch_op.create_foreign_key('fk_review_items_image_id_images', 'images', ['image_id'],
                                    ['id'], ondelete='CASCADE')
    with op.batch_alter_table('relabels', schema=None) as batch_op:
        batch_op.drop_constraint('fk_relabels_image_id_images', type_='foreignkey')
        batch_op.create_foreign_key('fk_relabels_image_id_images', 'images', ['image_id'],
                                    ['id'], ondelete='CASCADE')
        batch_op.drop_column('image_sha256')
