"""install facts: what this database was made with (the patient salt's fingerprint)

``install_facts`` keeps facts about the deployment that must not drift, e.g. an HMAC
fingerprint of the patient salt the stored patient ids were hashed with: indexing refuses to
run with another salt (a wiped home, a second host without ``CXR_PATIENT_SALT``) instead of
hashing the same patients differently.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 05:30:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'install_facts',
        sa.Column('key', sa.String(length=100), nullable=False),
        sa.Column('value', sa.Text(), nullable=False),
        sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('key', name=op.f('pk_install_facts')))


def downgrade() -> None:
    op.drop_table('install_facts')
