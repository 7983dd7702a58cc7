"""File digest cache: sha256 of local files keyed by path, valid while size, mtime_ns,
ctime_ns and inode are unchanged (registry.file_digests).

Revision ID: 0003_file_digests
Revises: 0002_batch_jobs
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = '0003_file_digests'
down_revision = '0002_batch_jobs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('file_digests',
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
    sa.Column('ctime_ns', sa.BigInteger(), nullable=False),
    sa.Column('inode', sa.BigInteger(), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('hashed', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('path')
    )


def downgrade() -> None:
    op.drop_table('file_digests')
