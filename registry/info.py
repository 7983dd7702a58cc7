"""Plain result objects returned by the Python API (JSON-ready with `to_dict`).

They are built from database rows in one place each: `registry.refs.describe` for
versions, `registry.artifacts.describe` for artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from registry.names import artifact_ref, parse_ref, version_ref


def utc(dt: datetime) -> datetime:
    """SQLite hands datetimes back naive; everything stored is UTC."""
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


@dataclass
class VersionInfo:
    """One immutable adapter version. `ref` is `name:number`."""

    name: str
    number: int
    digest: str
    created: datetime
    kind: str
    size: int
    author: str
    r: int | None = None
    mora_type: int | None = None
    base_model: str | None = None
    base_revision: str | None = None
    message: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    parent: str | None = None
    spec: dict[str, Any] | None = None
    base_files: dict[str, str] | None = None
    files: list[dict[str, Any]] | None = None
    id: int = 0  # database id (internal)

    @property
    def ref(self) -> str:
        return version_ref(self.name, self.number)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "ref": self.ref, "name": self.name, "number": self.number, "digest": self.digest,
            "created": self.created.isoformat(), "kind": self.kind, "r": self.r,
            "mora_type": self.mora_type, "size": self.size, "author": self.author,
            "base_model": self.base_model, "base_revision": self.base_revision,
            "parent": self.parent, "aliases": self.aliases, "meta": self.meta, "message": self.message,
        }
        if self.files is not None:
            d["files"] = self.files
        if self.base_files is not None:
            d["base_files"] = self.base_files
        if self.spec is not None:
            d["spec"] = self.spec
        return d


@dataclass
class ArtifactInfo:
    """A recorded merge output. `ref` is `artifact:<id>`; `artifact@sha256:<prefix>` also resolves."""

    id: int
    digest: str
    kind: str
    path: str
    files: dict[str, str]
    recipe: dict[str, Any]
    report: dict[str, Any] | None
    inputs: list[tuple[str, float]]
    author: str
    created: datetime

    @property
    def ref(self) -> str:
        return artifact_ref(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.digest, "kind": self.kind, "path": self.path,
                "files": self.files, "recipe": self.recipe, "report": self.report,
                "inputs": [{"ref": r, "weight": w} for r, w in self.inputs],
                "author": self.author, "created": self.created.isoformat()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactInfo:
        """The inverse of `to_dict` (an artifact sent between processes)."""
        return cls(id=parse_ref(d["ref"]).artifact_id, digest=d["digest"], kind=d["kind"], path=d["path"],
                   files=dict(d["files"]), recipe=d["recipe"], report=d["report"],
                   inputs=[(i["ref"], i["weight"]) for i in d["inputs"]], author=d["author"],
                   created=datetime.fromisoformat(d["created"]))


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    events: int = 0
    artifacts: int = 0
    bytes_read: int = 0  # blob content actually read (0 for a cheap remote check)
    mode: str = "full"  # "full": every blob re-hashed; "cheap": remote metadata only

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings,
                "blobs_checked": self.blobs, "bytes_checked": self.bytes,
                "blob_bytes_read": self.bytes_read, "mode": self.mode,
                "events_checked": self.events, "artifacts_checked": self.artifacts}


@dataclass
class GcReport:
    dry_run: bool
    blobs: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    unfinished: list[str] = field(default_factory=list)  # outputs of killed merges, left for the user
    kept_young: list[str] = field(default_factory=list)  # unreferenced but within the grace period
    cache_trimmed: int = 0  # read-through cache entries removed

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "blobs_removed": self.blobs, "leftovers_removed": self.leftovers,
                "bytes_freed": self.bytes_freed, "unfinished_outputs": self.unfinished,
                "kept_within_grace": self.kept_young, "cache_entries_trimmed": self.cache_trimmed}
