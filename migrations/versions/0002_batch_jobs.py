"""Batch jobs: leases and results of `adapters batch`, keyed by the digest of their inputs.

Revision ID: 0002_batch_jobs
Revises: 0001_initial
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = '0002_batch_jobs'
down_revision = '0001_initial'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batch_jobs',
    sa.Column('key', sa.String(length=71), nullable=False),
    sa.Column('output', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires', sa.DateTime(timezone=True), nullable=True),
    sa.Column('artifact_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], ),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('batch_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_batch_jobs_output', ['output'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('batch_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_batch_jobs_output')
    op.drop_table('batch_jobs')
