"""The registry's Python API: `Registry.open(...)`, then one method per verb (push, resolve,
list, show, tag, untag, delete, pull, materialize, check_base, file_digests, register_artifact,
artifact, check_artifact, lineage, audit, events, complete_refs, verify, gc, record_verify,
last_verify, and the batch job leases). Importing it does not import torch: only a push
validates the adapter with mora_core, which imports torch then.

`Registry` is a facade: each method hands its arguments to the module that holds that idea
(`ingest`, `refs`, `queries`, `aliases`, `checkout`, `artifacts`, `lineage`, `audit`,
`maintenance`; see README.md's Layout). Write transactions are serialised (SQLite: `BEGIN
IMMEDIATE`; PostgreSQL: the `registry_state` row lock, see `registry.db`), which makes
version numbers gap-free and the audit chain linear under concurrent pushes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from registry import (
    aliases,
    artifacts,
    audit,
    checkout,
    ingest,
    jobs,
    lineage,
    maintenance,
    outputs,
    queries,
    refs,
)
from registry.blob_backend import BlobBackend
from registry.blob_config import (
    BLOB_URL,
    check_agreement,
    given_blob_url,
    local_backend,
    open_backend,
)
from registry.blob_config import recorded as recorded_setting
from registry.blobs import Progress
from registry.config import resolve_home, resolve_url, sqlite_file
from registry.db import Database, ensure_schema, is_sqlite
from registry.digests import manifest_digest
from registry.errors import IntegrityError, RegistryError
from registry.file_digests import PendingDigests, file_digests, recorder
from registry.file_digests import lookup as lookup_digests
from registry.folders import check_base
from registry.hub import base_identity, resolve_base
from registry.info import ArtifactInfo, GcReport, VerifyReport, VersionInfo
from registry.names import artifact_ref, parse_meta


class Registry:
    """A handle on one store (database + blob directory). Not shared between threads."""

    def __init__(self, home: Path, url: str, blob_url: str | None = None):
        self.home = home
        self.url = url
        self.db = Database(url)
        self.engine = self.db.engine
        self._given_blob_url = given_blob_url(blob_url)
        self._blobs: BlobBackend | None = None
        self._read = self.db.read  # sessions for tests and benchmarks that look at rows
        self._write = self.db.write

    @property
    def blobs(self) -> BlobBackend:
        """The blob backend (local directory, or the S3 bucket recorded in the database),
        opened on first use: listing never imports boto3 (see `registry.blob_config`)."""
        if self._blobs is None:
            with self.db.read() as s:
                self._blobs = open_backend(self.home, self._given_blob_url, s, self.db.writing)
        return self._blobs

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, home: str | Path | None = None, db_url: str | None = None,
             blob_url: str | None = None, *, create: bool = True) -> Registry:
        """Open a store; with `create` (the default) make it if needed (home 0700, database 0600).

        home: arg, else ADAPTERS_HOME, else the user data dir. db_url: arg, else
        ADAPTERS_DB_URL, else `<home>/registry.db` (SQLite). blob_url: arg, else
        ADAPTERS_BLOB_URL, else the URL recorded in the database, else `<home>/blobs`
        (see `registry.blob_config`; a URL differing from the recorded one is an error).
        The SQLite schema upgrades itself; an empty PostgreSQL database is initialised; an
        older one needs `adapters db upgrade`.
        Without `create`, a missing home or SQLite file raises `StoreMissing` (nothing created).
        """
        home = resolve_home(home, create=create)
        url = resolve_url(home, db_url)
        if is_sqlite(url) and url == resolve_url(home):
            sqlite_file(home, create)
        reg = cls(home, url, blob_url)
        ensure_schema(reg.engine, auto=is_sqlite(url), lock_path=home / ".schema.lock")
        with reg.db.read() as s:  # one small query; the backend itself imports nothing heavy
            recorded_url = recorded_setting(s, BLOB_URL)
            check_agreement(recorded_url, reg._given_blob_url)
        if not recorded_url and not reg._given_blob_url:
            # the home's blob directory exists from open (as before backends); which backend is
            # used is decided at first use, so a URL another machine binds meanwhile is seen
            local_backend(home)
        return reg

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ versions
    def push(self, folder: str | Path, name: str, *, base_model: str | None = None,
             base_revision: str | None = None, base_dir: str | Path | None = None,
             parent: str | None = None, tags: Sequence[str] = (), meta: dict[str, str] | Iterable[str] | None = None,
             message: str | None = None, progress: Progress | None = None) -> VersionInfo:
        """Store an adapter folder as the next version of `name` (or answer the identical one)."""
        base = resolve_base(base_dir, self.home)  # a folder, or hf:ORG/NAME[@REV] through the HF cache
        if base is not None:
            base_model, base_revision = base_identity(base, base_model, base_revision)
            base_dir = base.folder
        return ingest.push(self.db, self.blobs, folder, name, base_model=base_model, base_revision=base_revision,
                           base_dir=base_dir, parent=parent, tags=tags, meta=meta, message=message,
                           progress=progress)

    def resolve(self, ref: str) -> VersionInfo:
        """The version a reference names; RegistryError for unknown or ambiguous references."""
        return refs.resolve(self.db, ref)

    def list(self, name: str | None = None, *, base_model: str | None = None,
             where: dict[str, str] | Iterable[str] | None = None, limit: int = 50,
             offset: int = 0) -> list[VersionInfo]:
        """Versions, newest first (one indexed, paginated query plus one for the page's aliases)."""
        return queries.list_versions(self.db, name, base_model=base_model, where=where, limit=limit, offset=offset)

    def show(self, ref: str) -> VersionInfo | ArtifactInfo:
        """Everything recorded about a version or an artifact."""
        return queries.show(self.db, ref)

    def tag(self, ref: str, alias: str) -> VersionInfo:
        """Point `name@alias` at the version `ref` names (moving it if it exists; audited)."""
        return aliases.tag(self.db, ref, alias)

    def untag(self, name: str, alias: str) -> str:
        """Remove an alias; returns the ref it pointed at (audited)."""
        return aliases.untag(self.db, name, alias)

    def delete(self, ref: str) -> str:
        """Delete a version no other version or artifact derives from (audited; blobs go at gc)."""
        return maintenance.delete(self.db, ref)

    def forget_artifact(self, ref: str, delete_files: bool = False) -> dict[str, Any]:
        """Forget an artifact (audited), optionally deleting the files it records."""
        return artifacts.forget(self.db, ref, delete_files)

    # ------------------------------------------------------------------ reading bytes
    def pull(self, ref: str, out: str | Path | None = None, progress: Progress | None = None) -> Path:
        """Write the version's PEFT folder to `out` (default ./<name>-<N>), verified, atomically; audited."""
        return checkout.pull(self.db, self.blobs, ref, out, progress)

    def materialize(self, ref: str) -> Path:
        """A verified PEFT folder for `ref`, cached under the home and re-verified on each call."""
        return checkout.materialize(self.db, self.blobs, self.home, ref)

    def check_base(self, ref: str, base_dir: str | Path) -> list[str]:
        """Differences between the base weights recorded at push and those in `base_dir`."""
        folder = resolve_base(base_dir, self.home).folder  # hf:ORG/NAME[@REV] too
        return check_base(self.resolve(ref).base_files, folder, self.file_digests)

    def file_digests(self, paths: Sequence[str | Path], progress: Progress | None = None) -> dict[str, str]:
        """{file name: `sha256:<hex>`} of local files, hashing only those whose (path, size,
        mtime_ns, ctime_ns, inode) is not cached in the store; names must be distinct."""
        return file_digests(self.db, paths, progress)

    def lookup_file_digests(self, paths: Sequence[str | Path]) -> PendingDigests:
        """`file_digests` in steps: what the cache answers now; `.hash()` reads the other files
        (no database: any thread), `finish_file_digests` records them and answers all."""
        return lookup_digests(self.db, paths)

    def finish_file_digests(self, pending: PendingDigests) -> dict[str, str]:
        """The last step of `lookup_file_digests`: {file name: `sha256:<hex>`}, in order."""
        return pending.finish(recorder(self.db))

    # ------------------------------------------------------------------ artifacts and lineage
    def register_artifact(self, *, kind: str, path: Path, files: dict[str, str] | None = None,
                          recipe: dict, inputs: list[tuple[str, float]],
                          report: dict | None = None, output: int | None = None) -> ArtifactInfo:
        """Record a merged output in place (not copied), with lineage edges from its inputs.

        `files` ({relative path: `sha256:` digest}, e.g. computed while writing) is taken as
        given (checked for form and presence, not re-read); without it each file is hashed.
        `output`: the token of `begin_output`, completed in the same transaction.
        """
        return artifacts.register(self.db, kind=kind, path=path, files=files, recipe=recipe, inputs=inputs,
                                  output=output,
                                  report=report)

    def artifact(self, ref: str) -> ArtifactInfo:
        """Everything recorded about an artifact (`artifact:ID` or `artifact@sha256:PREFIX`)."""
        return artifacts.artifact(self.db, ref)

    def check_artifact(self, ref: str) -> list[str]:
        """Problems of one artifact's files (missing, altered); [] when every file matches its record."""
        return artifacts.check(self.db, ref)

    def lineage(self, ref: str, max_depth: int = 1000) -> dict[str, Any]:
        """Ancestors (parents, base model) and descendants (child versions, artifacts) of `ref`.

        Returns {"root": ref, "nodes": [{id, type, ...}], "edges": [{from, to, kind, weight?}]}.
        """
        return lineage.build(self.db, ref, max_depth)

    # ------------------------------------------------------------------ audit
    def audit(self, action: str, subject: str, details: dict, *, name: str | None = None) -> dict[str, Any]:
        """Append an event to the audit chain (for other components: merge, export...)."""
        return audit.record(self.db, action, subject, details, name)

    def events(self, ref: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit events, oldest first; for a name all its events, for `name:N`/alias that version's."""
        return queries.events(self.db, ref, limit)

    def complete_refs(self, prefix: str, limit: int = 50) -> list[str]:
        """References starting with `prefix`, for shell completion: names, `name:N`, `name@alias`."""
        return queries.complete_refs(self.db, prefix, limit)

    # ------------------------------------------------------------------ outputs being written
    def begin_output(self, path: str | Path, kind: str, pid: int | None = None) -> int:
        """Record an output process `pid` (default: this one) starts writing (before its first
        byte); returns a token."""
        return outputs.begin(self.db, path, kind, pid)

    def output_placed(self, token: int, path: str | Path) -> None:
        """The output of `token` was just renamed into place (a re-run may replace it if killed now)."""
        outputs.placed(self.db, token, path)

    def end_output(self, token: int) -> None:
        """Forget a pending output whose writer failed and cleaned up."""
        outputs.end(self.db, token)

    def reclaim_output(self, path: str | Path) -> list[str]:
        """Remove what killed merges left at `path` (their partial folder, their unregistered output)."""
        return outputs.reclaim(self.db, path)

    # ------------------------------------------------------------------ verify / gc
    def verify(self, progress: Progress | None = None, full: bool = False) -> VerifyReport:
        """Check every blob and artifact file, walk the audit chain. `report.ok` is False on damage.

        Local blobs are always re-hashed; remote ones get the backend's cheap check unless `full`."""
        return maintenance.verify(self.db, self.blobs, progress, full=full)

    def gc(self, dry_run: bool = False, grace_s: float | None = None) -> GcReport:
        """Mark and sweep: remove blobs no version references (remote ones only when older than
        the grace period) and leftovers of interrupted writes (audited)."""
        return maintenance.gc(self.db, self.blobs, self.home, dry_run, grace_s=grace_s)

    def record_verify(self, report: dict[str, Any]) -> dict[str, Any]:
        """Keep `report` (a VerifyReport dict) as this home's last verify result, stamped; returns it."""
        return maintenance.record_verify(self.home, report)

    def last_verify(self) -> dict[str, Any] | None:
        """The last report `record_verify` kept, or None when verify never ran from this home."""
        return maintenance.last_verify(self.home)

    # ------------------------------------------------------------------ batch jobs (see registry.jobs)
    def claim_job(self, key: str, output: str, owner: str, *, reuse_done: bool = True) -> jobs.Claim:
        """Lease job `key` for `owner`, or say it is cached / run by a live owner."""
        with self.db.writing() as s:
            return jobs.claim(s, key, output, owner, reuse_done=reuse_done)

    def renew_jobs(self, keys: Sequence[str], owner: str) -> None:
        """Extend `owner`'s leases on `keys`."""
        with self.db.writing() as s:
            jobs.renew(s, list(keys), owner)

    def finish_job(self, key: str, owner: str, artifact_ref: str | None, error: str | None = None) -> None:
        """Record a job's result: the artifact it registered, or its error."""
        with self.db.writing() as s:
            jobs.finish(s, key, owner, artifacts.artifact_row(s, artifact_ref).id if artifact_ref else None, error)

    def release_job(self, key: str, owner: str) -> None:
        """Give up `owner`'s lease on `key`."""
        with self.db.writing() as s:
            jobs.release(s, key, owner)

    def batch_output(self, output: str) -> str | None:
        """The artifact ref of the batch job that last wrote `output`, if any."""
        with self.db.read() as s:
            row = jobs.wrote_output(s, output)
            return artifact_ref(row.artifact_id) if row is not None and row.artifact_id else None


__all__ = ["ArtifactInfo", "GcReport", "IntegrityError", "Registry", "RegistryError", "VerifyReport",
           "VersionInfo", "manifest_digest", "parse_meta", "resolve_home", "resolve_url"]
