"""Security and crash recovery: the signed audit head, stored file modes, pending outputs.

- registry_state.audit_mac: HMAC of the audit head under $ADAPTERS_AUDIT_KEY (registry.signing);
- version_files.mode: the permission bits of the pushed file (a pull keeps them);
- outputs: merge outputs being written (registered before the first byte, removed when the
  artifact is registered), so a re-run or `gc` can clean what a killed merge left.

Revision ID: 0004_security
Revises: 0003_file_digests
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_security'
down_revision = '0003_file_digests'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('registry_state', schema=None) as batch_op:
        batch_op.add_column(sa.Column('audit_mac', sa.String(length=64), nullable=True))
    with op.batch_alter_table('version_files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mode', sa.Integer(), nullable=True))
    op.create_table('outputs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('partial', sa.Text(), nullable=False),
    sa.Column('device', sa.BigInteger(), nullable=True),
    sa.Column('inode', sa.BigInteger(), nullable=True),
    sa.Column('started', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.create_index('ix_outputs_path', ['path'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.drop_index('ix_outputs_path')
    op.drop_table('outputs')
    with op.batch_alter_table('version_files', schema=None) as batch_op:
        batch_op.drop_column('mode')
    with op.batch_alter_table('registry_state', schema=None) as batch_op:
        batch_op.drop_column('audit_mac')
