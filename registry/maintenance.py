"""Keeping the store honest and small: `delete` forgets a version, `gc` frees the bytes
nothing refers to any more (and leftovers of interrupted writes; it also forgets cached
digests of files that are gone or changed), `verify` re-hashes every blob and artifact file
(never trusting the digest cache) and walks the audit chain.

gc runs in a write transaction (the writer lock), so no push can publish a blob that gc is
about to judge unreferenced; a push's temp files are flock-ed by their writer and skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, select

from registry import audit, file_digests, outputs, records, refs, signing
from registry.artifacts import damage
from registry.blob_backend import BlobBackend
from registry.blobs import missing as blob_missing
from registry.checkout import CACHE, TMP_MARK
from registry.copying import Progress
from registry.db import Database
from registry.errors import RegistryError
from registry.faults import pause_point
from registry.info import GcReport, VerifyReport
from registry.models import (
    Alias,
    Artifact,
    ArtifactInput,
    AuditEvent,
    Blob,
    Name,
    State,
    Version,
    VersionFile,
    VersionMeta,
)
from registry.names import artifact_ref, version_ref

USERS_SHOWN = 5
LAST_VERIFY = "last-verify.json"


def delete(db: Database, ref: str) -> str:
    """Delete a version no other version or artifact derives from (audited; blobs go at gc)."""
    with db.writing() as s:
        v = refs.version_row(s, ref)
        label, name = refs.label(v), v.adapter.name
        if s.scalar(select(Version.id).where(Version.parent_id == v.id).limit(1)) is not None:
            raise RegistryError(f"{label}: other versions derive from it (--parent); delete them first")
        if s.scalar(select(ArtifactInput.artifact_id).where(ArtifactInput.version_id == v.id).limit(1)):
            raise RegistryError(f"{label}: merged artifacts were built from it; it stays for their lineage")
        s.execute(sql_delete(Alias).where(Alias.version_id == v.id))
        s.execute(sql_delete(VersionMeta).where(VersionMeta.version_id == v.id))
        s.execute(sql_delete(VersionFile).where(VersionFile.version_id == v.id))
        s.delete(v)
        audit.append(s, "delete", label, {"digest": v.digest}, name=name)
    return label


def verify(db: Database, blobs: BlobBackend, progress: Progress | None = None,
           full: bool = False) -> VerifyReport:
    """Check every blob and artifact file, recompute the rows against the audit events
    (`registry.records`), walk the audit chain and check its signature (`registry.signing`).
    `report.ok` is False on damage.

    Local blobs are always re-hashed. Remote blobs get the backend's cheap check (S3: one
    HEAD each, 16 in flight: presence, size, recorded digest and stored SHA-256 checksum)
    unless `full`, which re-reads and re-hashes every byte (2 blobs at a time: each streams
    with its own parallel ranges). `report.bytes_read` says how many blob bytes were read.

    Everything is read in one snapshot (PostgreSQL: REPEATABLE READ). A blob found missing is
    judged again under the writer lock with fresh rows: a `gc` that ran meanwhile may have
    removed it legitimately (its version deleted after the snapshot), which is not damage.
    """
    rep = VerifyReport()
    rep.mode = "full" if full or not blobs.remote else "cheap"
    missing: list[tuple[str, int]] = []
    with db.read() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        recorded = s.execute(select(Blob.digest, Blob.size).order_by(Blob.digest)).all()
        referenced = set(s.scalars(select(VersionFile.blob).distinct()))
        pause_point("verify_listed")
        workers = (2 if full else 16) if blobs.remote else 1
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda b: blobs.check_blob(b[0], b[1], full=full, progress=progress),
                                    recorded))
        for (digest, size), result in zip(recorded, results):
            problem = result.problem
            rep.blobs += 1
            rep.bytes += size
            rep.bytes_read += result.bytes_read
            if problem and problem.startswith(blob_missing(digest)) and digest in referenced:
                missing.append((digest, size))
            elif problem and digest in referenced:
                rep.problems.append(f"{problem} (used by {', '.join(_users(s, digest))})")
            elif problem:
                rep.warnings.append(f"{problem} (unreferenced; gc forgets it)")
        for digest in sorted(referenced - {d for d, _ in recorded}):
            rep.problems.append(f"blob {digest} is referenced but not recorded")
        for a in s.scalars(select(Artifact).order_by(Artifact.id)):
            rep.artifacts += 1
            ref = artifact_ref(a.id)
            root = Path(a.path)
            if not root.exists():
                rep.warnings.append(f"{ref}: {a.path} is missing (moved or deleted)")
                continue
            try:
                files = json.loads(a.files)
            except ValueError:
                files = None
            if not isinstance(files, dict):
                rep.problems.append(f"{ref}: its file list is not a JSON object (rewritten)")
                continue
            for altered, line in damage(ref, root, files):
                (rep.problems if altered else rep.warnings).append(line)
        rep.events = s.scalar(select(func.count()).select_from(AuditEvent)) or 0
        rep.problems.extend(audit.verify_chain(s))
        problems, warnings = records.check_rows(s)
        rep.problems.extend(problems)
        rep.warnings.extend(warnings)
        state = s.get(State, 1)
        if state is not None:
            problems, warnings = signing.check(state)
            rep.problems.extend(problems)
            rep.warnings.extend(warnings)
    if missing:
        _recheck_missing(db, blobs, missing, rep)
    return rep


def _users(s, digest: str) -> list[str]:
    return [version_ref(n, num) for n, num in s.execute(
        select(Name.name, Version.number).join(Version, Version.name_id == Name.id)
        .join(VersionFile, VersionFile.version_id == Version.id)
        .where(VersionFile.blob == digest).limit(USERS_SHOWN))]


def _recheck_missing(db: Database, blobs: BlobBackend, found: list[tuple[str, int]], rep: VerifyReport) -> None:
    """Blobs missing in the snapshot: damage only if, with no gc running (writer lock) and fresh
    rows, a version still uses them and they are still not there (the backend's cheap check)."""
    with db.writing() as s:
        for digest, size in found:
            users = _users(s, digest)
            if not users:
                continue
            problem = blobs.check_blob(digest, size, full=False).problem
            if problem is not None:
                rep.problems.append(f"{problem} (used by {', '.join(users)})")


def gc(db: Database, blobs: BlobBackend, home: Path, dry_run: bool = False,
       grace_s: float | None = None) -> GcReport:
    """Mark and sweep: remove blobs no version references and leftovers of interrupted
    writes (audited), under the writer lock so no push commits meanwhile.

    Blobs younger than `grace_s` (default: the backend's; S3: 1 hour, or
    $ADAPTERS_GC_GRACE_S) are kept: a push uploads to S3 before its transaction commits, so
    a fresh unreferenced blob may be about to be referenced (and a push re-checks its blobs
    under the lock, uploading again what a gc removed). A remote store's local read-through
    cache is trimmed too (unreferenced entries, then down to its size bound).
    """
    rep = GcReport(dry_run=dry_run)
    grace = blobs.sweep_grace_s if grace_s is None else grace_s
    if grace < 0:
        raise RegistryError(f"--grace {grace_s}: must not be negative")
    with db.read() if dry_run else db.writing() as s:
        referenced = set(s.scalars(select(VersionFile.blob).distinct()))
        now = time.time()
        for entry in list(blobs.iter_blobs()):
            if entry.digest in referenced:
                continue
            if now - entry.modified < grace:
                rep.kept_young.append(entry.digest)
                continue
            rep.blobs.append(entry.digest)
            rep.bytes_freed += entry.size
            if not dry_run:
                blobs.remove(entry.digest)
        for digest in s.scalars(select(Blob.digest)).all():
            if digest not in referenced and not dry_run:
                s.execute(sql_delete(Blob).where(Blob.digest == digest))
        for name, size in list(blobs.leftovers(grace)):
            rep.leftovers.append(str(name))
            rep.bytes_freed += size
            if not dry_run:
                blobs.remove_leftover(str(name))
        rep.bytes_freed += _cache_leftovers(home / CACHE, rep, dry_run)
        partials, freed, rep.unfinished = outputs.gc_leftovers(s, dry_run)
        rep.leftovers.extend(partials)
        rep.bytes_freed += freed
        cache = getattr(blobs, "cache", None)
        if cache is not None:
            trimmed, freed = cache.trim(keep=referenced, dry_run=dry_run)
            rep.cache_trimmed = len(trimmed)
            rep.bytes_freed += freed
        if not dry_run:
            file_digests.prune(s)
            audit.append(s, "gc", "store", {"blobs_removed": len(rep.blobs),
                                           "leftovers_removed": len(rep.leftovers),
                                           "bytes_freed": rep.bytes_freed})
    return rep


def record_verify(home: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Keep `report` (a VerifyReport dict) as this home's last verify result, stamped; returns it."""
    record = {**report, "finished": audit.now_iso()}
    path = home / LAST_VERIFY
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


def last_verify(home: Path) -> dict[str, Any] | None:
    """The last report `record_verify` kept, or None when verify never ran from this home."""
    try:
        return json.loads((home / LAST_VERIFY).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _cache_leftovers(cache: Path, rep: GcReport, dry_run: bool) -> int:
    """Half-written materialize folders whose process is gone."""
    freed = 0
    if not cache.is_dir():
        return 0
    for d in cache.glob(f".*{TMP_MARK}*"):
        try:
            pid = int(d.name.split(TMP_MARK)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if outputs.process_alive(pid):
            continue
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        rep.leftovers.append(str(d))
        freed += size
        if not dry_run:
            shutil.rmtree(d, ignore_errors=True)
    return freed

