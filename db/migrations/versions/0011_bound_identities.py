"""bound identities: an OIDC account's identity never changes form silently

``user_identities`` binds an account (issuer, subject) to the identity its records are kept
under the first time it signs in (a verified email, else ``issuer|subject``). A later sign-in
of the same account that resolves to another identity (an email that became verified, a
changed email) is refused instead of re-keying who did what.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 05:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'user_identities',
        sa.Column('issuer', sa.String(length=500), nullable=False),
        sa.Column('subject', sa.String(length=500), nullable=False),
        sa.Column('identity', sa.String(length=200), nullable=False),
        sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('issuer', 'subject', name=op.f('pk_user_identities')))


def downgrade() -> None:
    op.drop_table('user_identities')
