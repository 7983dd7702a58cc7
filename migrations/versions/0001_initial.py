"""Initial registry schema: names, versions, files, blobs, aliases, meta, artifacts, audit.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = '0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('files', sa.Text(), nullable=False),
    sa.Column('recipe', sa.Text(), nullable=False),
    sa.Column('report', sa.Text(), nullable=True),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index('ix_artifacts_digest', ['digest'], unique=False)

    op.create_table('audit_events',
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('at', sa.String(length=40), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('subject', sa.String(length=300), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('details', sa.Text(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_name', ['name', 'seq'], unique=False)
        batch_op.create_index('ix_audit_subject', ['subject', 'seq'], unique=False)

    op.create_table('blobs',
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest')
    )
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.create_index('ix_blobs_size', ['size'], unique=False)

    op.create_table('names',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('latest', sa.Integer(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('registry_state',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('audit_seq', sa.BigInteger(), nullable=False),
    sa.Column('audit_head', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('r', sa.Integer(), nullable=True),
    sa.Column('mora_type', sa.Integer(), nullable=True),
    sa.Column('spec', sa.Text(), nullable=False),
    sa.Column('base_model', sa.String(length=300), nullable=True),
    sa.Column('base_revision', sa.String(length=200), nullable=True),
    sa.Column('base_files', sa.Text(), nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('meta', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['name_id'], ['names.id'], ),
    sa.ForeignKeyConstraint(['parent_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name_id', 'digest', name='uq_versions_name_digest'),
    sa.UniqueConstraint('name_id', 'number', name='uq_versions_name_number')
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.create_index('ix_versions_base_model', ['base_model', 'id'], unique=False)
        batch_op.create_index('ix_versions_digest', ['digest'], unique=False)
        batch_op.create_index('ix_versions_parent', ['parent_id'], unique=False)

    op.create_table('aliases',
    sa.Column('name_id', sa.Integer(), nullable=False),
    sa.Column('alias', sa.String(length=100), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['name_id'], ['names.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('name_id', 'alias')
    )
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.create_index('ix_aliases_version', ['version_id'], unique=False)

    op.create_table('artifact_inputs',
    sa.Column('artifact_id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['artifact_id'], ['artifacts.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('artifact_id', 'version_id')
    )
    with op.batch_alter_table('artifact_inputs', schema=None) as batch_op:
        batch_op.create_index('ix_artifact_inputs_version', ['version_id'], unique=False)

    op.create_table('version_files',
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=300), nullable=False),
    sa.Column('blob', sa.String(length=71), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['blob'], ['blobs.digest'], ),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('version_id', 'path')
    )
    with op.batch_alter_table('version_files', schema=None) as batch_op:
        batch_op.create_index('ix_version_files_blob', ['blob'], unique=False)

    op.create_table('version_meta',
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=100), nullable=False),
    sa.Column('value', sa.String(length=500), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('version_id', 'key')
    )
    with op.batch_alter_table('version_meta', schema=None) as batch_op:
        batch_op.create_index('ix_version_meta_kv', ['key', 'value', 'version_id'], unique=False)

    # the audit chain starts from the genesis hash (64 zeros); writers lock this row
    state = sa.table("registry_state", sa.column("id", sa.Integer), sa.column("audit_seq", sa.BigInteger),
                     sa.column("audit_head", sa.String))
    op.bulk_insert(state, [{"id": 1, "audit_seq": 0, "audit_head": "0" * 64}])



def downgrade() -> None:
    with op.batch_alter_table('version_meta', schema=None) as batch_op:
        batch_op.drop_index('ix_version_meta_kv')

    op.drop_table('version_meta')
    with op.batch_alter_table('version_files', schema=None) as batch_op:
        batch_op.drop_index('ix_version_files_blob')

    op.drop_table('version_files')
    with op.batch_alter_table('artifact_inputs', schema=None) as batch_op:
        batch_op.drop_index('ix_artifact_inputs_version')

    op.drop_table('artifact_inputs')
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.drop_index('ix_aliases_version')

    op.drop_table('aliases')
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_index('ix_versions_parent')
        batch_op.drop_index('ix_versions_digest')
        batch_op.drop_index('ix_versions_base_model')

    op.drop_table('versions')
    op.drop_table('registry_state')
    op.drop_table('names')
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.drop_index('ix_blobs_size')

    op.drop_table('blobs')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_subject')
        batch_op.drop_index('ix_audit_name')

    op.drop_table('audit_events')
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index('ix_artifacts_digest')

    op.drop_table('artifacts')
