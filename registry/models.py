"""The registry schema as SQLAlchemy 2.x models.

The database schema is created and changed only by the alembic migrations in
`migrations/`; a test checks that these models and the migrations agree. JSON
documents are stored as canonical text (sorted keys) so that SQLite and PostgreSQL
round-trip them byte for byte and digests over them stay reproducible.

Relationships are for reading (`version.adapter.name`, `version.parent`, `alias.version`):
rows are written explicitly, so collections are view-only and never cascade.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

DIGEST = String(71)  # "sha256:" + 64 hex


class Base(DeclarativeBase):
    pass


class State(Base):
    """One row (id=1): the audit chain's head. Write transactions lock it (serialises writers)."""

    __tablename__ = "registry_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    audit_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    audit_head: Mapped[str] = mapped_column(String(64), nullable=False)
    audit_mac: Mapped[str | None] = mapped_column(String(64))  # HMAC of the head (registry.signing)


class Name(Base):
    """An adapter name (`team/llama-mora`); `latest` is the highest number ever given."""

    __tablename__ = "names"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    latest: Mapped[int] = mapped_column(Integer, nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class Blob(Base):
    """A blob the store recorded (its bytes live in the blob directory under its digest)."""

    __tablename__ = "blobs"
    digest: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    __table_args__ = (Index("ix_blobs_size", "size"),)


class Version(Base):
    """An immutable adapter version `name:number`; `digest` covers its files only."""

    __tablename__ = "versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name_id: Mapped[int] = mapped_column(ForeignKey("names.id"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    digest: Mapped[str] = mapped_column(DIGEST, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    r: Mapped[int | None] = mapped_column(Integer)
    mora_type: Mapped[int | None] = mapped_column(Integer)
    spec: Mapped[str] = mapped_column(Text, nullable=False)
    base_model: Mapped[str | None] = mapped_column(String(300))
    base_revision: Mapped[str | None] = mapped_column(String(200))
    base_files: Mapped[str | None] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    meta: Mapped[str] = mapped_column(Text, nullable=False)
    author: Mapped[str] = mapped_column(String(200), nullable=False)
    message: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    __table_args__ = (
        UniqueConstraint("name_id", "number", name="uq_versions_name_number"),
        UniqueConstraint("name_id", "digest", name="uq_versions_name_digest"),
        Index("ix_versions_digest", "digest"),
        Index("ix_versions_parent", "parent_id"),
        Index("ix_versions_base_model", "base_model", "id"),
    )

    adapter: Mapped[Name] = relationship()
    parent: Mapped[Version | None] = relationship(remote_side=[id])
    files: Mapped[list[VersionFile]] = relationship(viewonly=True, order_by="VersionFile.path")
    aliases: Mapped[list[Alias]] = relationship(viewonly=True, order_by="Alias.alias")


class VersionFile(Base):
    """One file of a version: its path in the folder and the blob holding its bytes."""

    __tablename__ = "version_files"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(300), primary_key=True)
    blob: Mapped[str] = mapped_column(DIGEST, ForeignKey("blobs.digest"), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    mode: Mapped[int | None] = mapped_column(Integer)  # permission bits of the pushed file (None: older rows)
    __table_args__ = (Index("ix_version_files_blob", "blob"),)


class VersionMeta(Base):
    """`--meta key=value` pairs, one row each, so `list --where k=v` is an index lookup."""

    __tablename__ = "version_meta"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(500), nullable=False)
    __table_args__ = (Index("ix_version_meta_kv", "key", "value", "version_id"),)


class Alias(Base):
    """A movable label `name@alias` on one version of that name."""

    __tablename__ = "aliases"
    name_id: Mapped[int] = mapped_column(ForeignKey("names.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), nullable=False)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    __table_args__ = (Index("ix_aliases_version", "version_id"),)

    adapter: Mapped[Name] = relationship()
    version: Mapped[Version] = relationship()


class Artifact(Base):
    """A merged output recorded in place (not copied): its files' digests, recipe and report."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(DIGEST, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    files: Mapped[str] = mapped_column(Text, nullable=False)
    recipe: Mapped[str] = mapped_column(Text, nullable=False)
    report: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(200), nullable=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    __table_args__ = (Index("ix_artifacts_digest", "digest"),)

    inputs: Mapped[list[ArtifactInput]] = relationship(viewonly=True)


class ArtifactInput(Base):
    """Lineage edge version -> artifact, with the merge weight."""

    __tablename__ = "artifact_inputs"
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    weight: Mapped[float] = mapped_column(Float, nullable=False)
    __table_args__ = (Index("ix_artifact_inputs_version", "version_id"),)

    artifact: Mapped[Artifact] = relationship(viewonly=True)
    version: Mapped[Version] = relationship(viewonly=True)


class FileDigest(Base):
    """A cached digest of a local file, valid while the file's identity (size, mtime_ns,
    ctime_ns, inode) is what it was when hashed; see `registry.file_digests`."""

    __tablename__ = "file_digests"
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ctime_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    inode: Mapped[int] = mapped_column(BigInteger, nullable=False)
    digest: Mapped[str] = mapped_column(DIGEST, nullable=False)
    hashed: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class AuditEvent(Base):
    """Append-only; `hash = sha256(prev_hash + canonical event)`, see `registry.audit`."""

    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(40), nullable=False)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    subject: Mapped[str] = mapped_column(String(300), nullable=False)
    name: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text, nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)
    __table_args__ = (
        Index("ix_audit_name", "name", "seq"),
        Index("ix_audit_subject", "subject", "seq"),
    )


class BatchJob(Base):
    """One job of `adapters batch`, keyed by the digest of its inputs: its lease and its result.

    `status` is running (a live owner holds the lease until `lease_expires`), done (it
    produced `artifact_id`) or failed (`error`). A lease whose owner died or expired can be
    taken over; a done job is the cache.
    """

    __tablename__ = "batch_jobs"
    key: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    output: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    error: Mapped[str | None] = mapped_column(Text)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    __table_args__ = (Index("ix_batch_jobs_output", "output"),)


class Output(Base):
    """A merge output being written: recorded before its first byte, deleted when its artifact is
    registered. A row whose process is gone marks what a killed merge left (see registry.outputs)."""

    __tablename__ = "outputs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    partial: Mapped[str] = mapped_column(Text, nullable=False)
    device: Mapped[int | None] = mapped_column(BigInteger)  # the output folder's identity once renamed
    inode: Mapped[int | None] = mapped_column(BigInteger)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    __table_args__ = (Index("ix_outputs_path", "path"),)

class Setting(Base):
    """Store-wide configuration every machine must agree on (e.g. `blob_url`, `store_id`)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
