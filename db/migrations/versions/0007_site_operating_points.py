"""operating points scoped to a model and a dataset: site calibration

Before 0007 an operating point belonged to a run and applied everywhere. Now a row names the
model it thresholds (``model_ref``: "run:ID", or "default" for the shipped model, which has no
run) and optionally the dataset (site) it was chosen for: ``dataset_id`` NULL is the model's
global operating point, a dataset id a site's. ``sample_n`` is the size of the labelled sample
it was chosen on and ``details_json`` what was measured there (intervals, labels, the split).
Existing rows are global operating points of their run (model_ref backfilled "run:ID").

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 09:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('operating_points', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model_ref', sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column('dataset_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('sample_n', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('details_json', sa.Text(), nullable=True))
    op.execute("UPDATE operating_points SET model_ref = 'run:' || CAST(run_id AS VARCHAR(20))")
    # A site's operating point goes with its dataset (CASCADE: never SET NULL, which would
    # turn a site calibration into the model's global threshold).
    with op.batch_alter_table('operating_points', schema=None) as batch_op:
        batch_op.alter_column('model_ref', existing_type=sa.String(length=300), nullable=False)
        batch_op.alter_column('run_id', existing_type=sa.Integer(), nullable=True)
        batch_op.create_foreign_key(op.f('fk_operating_points_dataset_id_datasets'), 'datasets',
                                    ['dataset_id'], ['id'], ondelete='CASCADE')
        batch_op.create_index('ix_operating_points_scope', ['model_ref', 'dataset_id', 'id'],
                              unique=False)


def downgrade() -> None:
    # Rows without a run (the shipped model's site calibrations) cannot exist before 0007.
    op.execute("DELETE FROM operating_points WHERE run_id IS NULL OR dataset_id IS NOT NULL")
    with op.batch_alter_table('operating_points', schema=None) as batch_op:
        batch_op.drop_index('ix_operating_points_scope')
        batch_op.drop_constraint(op.f('fk_operating_points_dataset_id_datasets'),
                                 type_='foreignkey')
        batch_op.alter_column('run_id', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column('details_json')
        batch_op.drop_column('sample_n')
        batch_op.drop_column('dataset_id')
        batch_op.drop_column('model_ref')
