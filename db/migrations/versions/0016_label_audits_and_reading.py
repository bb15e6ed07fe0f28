"""label audits, blind and double reading, adjudication

- ``label_audits`` and ``label_audit_images``: a label audit (its K fold runs name it as their
  parent, ``runs.parent`` = ``"audit:ID"``, 0013) and every image's out-of-fold probabilities
  with the label it was given, its self-confidence and its rank among the flagged issues;
- ``relabels.kind`` ("label" | "read" | "consensus" | "adjudication"), ``reads_required`` and
  ``basis_json``: under double reading a reader's answer is a "read" row that counts only
  through a consensus row (enough readers agreeing) or an adjudication row; every row before
  0016 is a "label" (it counted at once), so the labels of every stored snapshot are unchanged;
- ``review_settings``: a dataset's reading mode (blind, reads per image), append-only.

Plain ADD COLUMNs (no batch copy): ``relabels`` is referenced (``undo_of``).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 06:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'label_audits',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('dataset_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('label_scheme', sa.String(length=20), nullable=False),
        sa.Column('label_source', sa.String(length=20), nullable=False),
        sa.Column('labels_json', sa.Text(), nullable=False),
        sa.Column('folds', sa.Integer(), nullable=False),
        sa.Column('seed', sa.Integer(), nullable=False),
        sa.Column('config_json', sa.Text(), nullable=False),
        sa.Column('label_snapshot_hash', sa.String(length=64), nullable=False),
        sa.Column('label_snapshot_relabel_id', sa.Integer(), nullable=True),
        sa.Column('n_images', sa.Integer(), nullable=False),
        sa.Column('result_json', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_by', sa.String(length=200), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'],
                                name=op.f('fk_label_audits_dataset_id_datasets'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_label_audits')))
    op.create_index(op.f('ix_label_audits_dataset_id'), 'label_audits', ['dataset_id'])
    op.create_table(
        'label_audit_images',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('audit_id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('fold', sa.Integer(), nullable=False),
        sa.Column('given', sa.Integer(), nullable=False),
        sa.Column('probs_json', sa.Text(), nullable=True),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('self_confidence', sa.Float(), nullable=True),
        sa.Column('suggested', sa.Integer(), nullable=True),
        sa.Column('issue_rank', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['audit_id'], ['label_audits.id'],
                                name=op.f('fk_label_audit_images_audit_id_label_audits'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'],
                                name=op.f('fk_label_audit_images_image_id_images')),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'],
                                name=op.f('fk_label_audit_images_run_id_runs'),
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_label_audit_images')),
        sa.UniqueConstraint('audit_id', 'image_id', name=op.f('uq_label_audit_images_audit_id')))
    op.create_index(op.f('ix_label_audit_images_image_id'), 'label_audit_images', ['image_id'])
    op.create_index('ix_label_audit_images_rank', 'label_audit_images', ['audit_id', 'issue_rank'])
    op.create_index('ix_label_audit_images_fold', 'label_audit_images', ['audit_id', 'fold'])
    op.create_table(
        'review_settings',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('dataset_id', sa.Integer(), nullable=False),
        sa.Column('blind', sa.Boolean(), nullable=False),
        sa.Column('reads_per_image', sa.Integer(), nullable=False),
        sa.Column('changed_by', sa.String(length=200), nullable=False),
        sa.Column('note', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'],
                                name=op.f('fk_review_settings_dataset_id_datasets'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_review_settings')))
    op.create_index('ix_review_settings_dataset', 'review_settings', ['dataset_id', 'id'])
    op.add_column('relabels', sa.Column('kind', sa.String(length=20), nullable=False,
                                        server_default='label'))
    op.add_column('relabels', sa.Column('reads_required', sa.Integer(), nullable=True))
    op.add_column('relabels', sa.Column('basis_json', sa.Text(), nullable=True))


def downgrade() -> None:
    # Rows of kind "read" would count as labels without their column: refuse to lose that.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT COUNT(*) FROM relabels WHERE kind <> 'label'")).scalar():
        raise RuntimeError("cannot downgrade below 0016: relabels hold double-reading rows "
                           "(read / consensus / adjudication) that an older schema cannot tell apart")
    for column in ('basis_json', 'reads_required', 'kind'):
        op.execute(f'ALTER TABLE relabels DROP COLUMN {column}')
    op.drop_index('ix_review_settings_dataset', table_name='review_settings')
    op.drop_table('review_settings')
    op.drop_index('ix_label_audit_images_fold', table_name='label_audit_images')
    op.drop_index('ix_label_audit_images_rank', table_name='label_audit_images')
    op.drop_index(op.f('ix_label_audit_images_image_id'), table_name='label_audit_images')
    op.drop_table('label_audit_images')
    op.drop_index(op.f('ix_label_audits_dataset_id'), table_name='label_audits')
    op.drop_table('label_audits')
