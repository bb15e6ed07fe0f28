"""paged queries: evaluation sizes stored (lists count no prediction rows); model outputs as columns (score, predicted class, top-2 margin) so review
queues sort and filter in SQL; indexes the review queues and label derivation use

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 17:40:00
"""
from __future__ import annotations

import json

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

INDEXES = (
    ('ix_relabels_image_reviewer', 'relabels', ['image_id', 'reviewer']),
    ('ix_relabels_undo_of', 'relabels', ['undo_of']),
    ('ix_eval_predictions_image', 'eval_predictions', ['image_id', 'evaluation_id']),
    ('ix_evaluations_run_dataset', 'evaluations', ['run_id', 'dataset_id']),
    ('ix_images_dataset_label', 'images', ['dataset_id', 'label', 'subtype']),
    ('ix_images_dataset_patient', 'images', ['dataset_id', 'patient']),
    ('ix_images_dataset_changed', 'images', ['dataset_id', 'content_changed_at']),
    ('ix_review_items_image', 'review_items', ['image_id']),
    ('ix_runs_created', 'runs', ['created_at']),
    ('ix_jobs_kind_params', 'jobs', ['kind', 'params_json']),
)


def _columns(probs: list[float], labels: list[str]) -> dict:
    """The same columns ``storage.evals.prediction_columns`` writes for new rows."""
    p = [float(v) for v in probs]
    if len(p) == 1 and len(labels) == 2:
        p = [1.0 - p[0], p[0]]
    if len(p) < 2:
        return {"score": None, "pred_index": None, "top2_margin": None}
    top = sorted(p, reverse=True)
    if len(p) == 2:
        score = p[1]
    elif "NORMAL" in labels:
        score = 1.0 - p[labels.index("NORMAL")]
    else:
        score = top[0]
    return {"score": score, "pred_index": p.index(top[0]), "top2_margin": top[0] - top[1]}


def upgrade() -> None:
    with op.batch_alter_table('eval_predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('pred_index', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('top2_margin', sa.Float(), nullable=True))
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('n_predictions', sa.Integer(), nullable=True))
    for name, table, cols in INDEXES:
        op.create_index(name, table, cols, unique=False)
    op.execute("UPDATE evaluations SET n_predictions = (SELECT count(*) FROM eval_predictions "
               "WHERE eval_predictions.evaluation_id = evaluations.id)")
    # Existing rows: the columns from their stored probabilities (nothing else changes).
    bind = op.get_bind()
    preds = sa.table('eval_predictions', sa.column('id', sa.Integer),
                     sa.column('evaluation_id', sa.Integer), sa.column('probs_json', sa.Text),
                     sa.column('score', sa.Float), sa.column('pred_index', sa.Integer),
                     sa.column('top2_margin', sa.Float))
    evals = sa.table('evaluations', sa.column('id', sa.Integer),
                     sa.column('labels_json', sa.Text))
    labels = {i: json.loads(lj) for i, lj in bind.execute(sa.select(evals.c.id,
                                                                    evals.c.labels_json))}
    last = 0
    while True:
        rows = bind.execute(sa.select(preds.c.id, preds.c.evaluation_id, preds.c.probs_json)
                            .where(preds.c.id > last).order_by(preds.c.id).limit(5000)).all()
        if not rows:
            break
        for pid, eid, pj in rows:
            bind.execute(preds.update().where(preds.c.id == pid).values(
                **_columns(json.loads(pj), labels.get(eid, []))))
        last = rows[-1][0]


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('n_predictions')
    with op.batch_alter_table('eval_predictions', schema=None) as batch_op:
        batch_op.drop_column('top2_margin')
        batch_op.drop_column('pred_index')
        batch_op.drop_column('score')
