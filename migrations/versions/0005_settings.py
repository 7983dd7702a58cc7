"""Store-wide settings (the blob URL every machine of a team uses, the store id).

Revision ID: 0005_settings
Revises: 0004_security
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = '0005_settings'
down_revision = '0004_security'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('settings',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )


def downgrade() -> None:
    op.drop_table('settings')
