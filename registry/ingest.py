"""Push: an adapter folder becomes the next immutable version of a name.

Order of work, which is what makes a push crash-safe (see registry.faults for the points a
test can stop it at): validate the arguments; copy every file into a locked temp file while
hashing it (the adapter is validated by mora_core in a second thread meanwhile); fsync; then
in ONE write transaction (the writer lock) publish the blobs under their digests and record
the version, its files, metadata, tags and audit event. A crash before the commit leaves
only temp files and unreferenced blobs, which `gc` removes; nothing half-made is visible.

Identical content under the same name answers the existing version (and stores nothing).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

from registry import aliases, audit, records, refs
from registry.blob_backend import BlobBackend
from registry.blobs import Progress, Staged
from registry.config import actor
from registry.db import Database
from registry.digests import canonical, manifest_digest
from registry.errors import RegistryError
from registry.faults import fault_point
from registry.file_digests import file_digests
from registry.folders import adapter_files, base_weight_files, check_fits_base, inspect_adapter
from registry.info import VersionInfo
from registry.models import Blob, Name, Version, VersionFile, VersionMeta
from registry.names import check_alias, check_name, check_text, parse_meta, version_ref
from registry.paths import check_file_name

MAX_BASE_MODEL = 300  # the database columns' sizes
MAX_BASE_REVISION = 200
MAX_MESSAGE = 4000
PUBLISH_TRIES = 3


def push(db: Database, blobs: BlobBackend, folder: str | Path, name: str, *, base_model: str | None = None,
         base_revision: str | None = None, base_dir: str | Path | None = None, parent: str | None = None,
         tags: Sequence[str] = (), meta: dict[str, str] | Iterable[str] | None = None,
         message: str | None = None, progress: Progress | None = None) -> VersionInfo:
    """Store an adapter folder as the next version of `name` (or answer the identical one).

    Bad input raises RegistryError with the store unchanged. Without `base_model`, a version
    with a `parent` records the parent's base model, revision and base digests.
    """
    check_name(name)
    tags = [check_alias(t) for t in tags]
    meta_d = parse_meta(meta)
    folder = Path(folder)
    base_model = check_text(base_model, "--base-model", MAX_BASE_MODEL)
    base_revision = check_text(base_revision, "--base-revision", MAX_BASE_REVISION)
    message = check_text(message, "--message", MAX_MESSAGE, lines=True)
    files = adapter_files(folder)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    for f in files:
        check_file_name(f.name, f"{folder}: file name")
    parent_info = refs.resolve(db, parent) if parent else None
    base_files = None
    if base_dir is not None:
        weight_files = base_weight_files(base_dir)
        check_fits_base(folder, base_dir)  # digests of a base the adapter cannot fit would only mislead
        base_files = file_digests(db, weight_files)
    if parent_info is not None and base_model is None:  # derived on the parent's base
        base_model, base_revision = parent_info.base_model, base_revision or parent_info.base_revision
        if base_files is None:
            base_files = parent_info.base_files
    staged: list[Staged] = []
    try:
        spec = _stage_all(db, blobs, folder, files, staged, progress)
        digests = {st.source.name: st.digest for st in staged}
        digest = manifest_digest(digests)
        if spec is None:
            spec = _known_spec(db, digest) or inspect_adapter(folder)
        fault_point("staged")
        for st in staged:
            blobs.make_durable(st)
        fault_point("durable")
        tries = 0
        while True:  # a blob this push only hashed may be removed by a concurrent gc: copy it then
            try:
                with db.writing() as s:
                    nm = s.scalar(select(Name).where(Name.name == name))
                    existing = None
                    if nm is not None:
                        existing = s.scalar(select(Version).where(Version.name_id == nm.id, Version.digest == digest))
                    if existing is not None:
                        for st in staged:
                            blobs.discard(st)
                        audit.append(s, "push", refs.label(existing), {"digest": digest, "unchanged": True}, name=name)
                        for t in tags:
                            aliases.move(s, nm, t, existing)
                        s.flush()
                        return refs.version_info(s, existing, full=False)
                    _publish(s, blobs, staged)
                    fault_point("published")
                    if nm is None:
                        nm = Name(name=name, latest=0, created=_now())
                        s.add(nm)
                        s.flush()
                    number = nm.latest + 1
                    nm.latest = number
                    v = Version(adapter=nm, number=number, digest=digest, kind=spec["kind"],
                                r=spec.get("r"), mora_type=spec.get("mora_type"),
                                spec=canonical(spec), base_model=base_model, base_revision=base_revision,
                                base_files=canonical(base_files) if base_files is not None else None,
                                parent_id=parent_info.id if parent_info else None, meta=canonical(meta_d),
                                author=actor(), message=message, created=_now(), size=sum(st.size for st in staged))
                    s.add(v)
                    s.flush()
                    for st in staged:
                        s.add(VersionFile(version_id=v.id, path=st.source.name, blob=st.digest, size=st.size,
                                          mode=modes[st.source.name]))
                    for k, val in meta_d.items():
                        s.add(VersionMeta(version_id=v.id, key=k, value=val))
                    s.flush()
                    row = records.content_digest(records.version_content(s, v))  # what verify recomputes
                    audit.append(s, "push", version_ref(name, number),
                                 {"digest": digest, "files": digests, "kind": spec["kind"],
                                  "base_model": base_model, "parent": parent, "row": row,
                                  "modes": {st.source.name: modes[st.source.name] for st in staged}}, name=name)
                    for t in tags:
                        aliases.move(s, nm, t, v)
                    s.flush()
                    fault_point("before_commit")
                    info = refs.version_info(s, v, full=False)
                break
            except _BlobVanished as gone:
                tries += 1
                if tries >= PUBLISH_TRIES:
                    raise RegistryError(f"{gone.staged.source}: its blob keeps vanishing (a gc running in a "
                                        "loop?); push again") from None
                staged[staged.index(gone.staged)] = fresh = blobs.stage(gone.staged.source, progress)
                blobs.make_durable(fresh)
        fault_point("committed")
        return info
    finally:
        for st in staged:
            blobs.discard(st)


def _stage_all(db: Database, blobs: BlobBackend, folder: Path, files: list[Path], staged: list[Staged],
               progress: Progress | None) -> dict[str, Any] | None:
    """Copy+hash every file into `staged`; returns the validated spec, or None when the content
    is probably an existing version's (its recorded spec is used then, or validation runs late).

    New content: validation (torch; the GIL is released in its reads and kernels) overlaps the
    copy. Content the store probably holds (a blob of the same size exists) is hashed first; if
    it is an existing version's content, a re-push costs one hashing pass.
    """
    largest = max(files, key=lambda f: f.stat().st_size)
    with ThreadPoolExecutor(1) as pool:
        spec_future = None if _has_size(db, largest.stat().st_size) else pool.submit(inspect_adapter, folder)
        try:
            for f in files:
                staged.append(_stage(db, blobs, f, progress))
                if spec_future is not None and spec_future.done() and spec_future.exception():
                    break
        finally:
            spec = spec_future.result() if spec_future is not None else None
    return spec


def _stage(db: Database, blobs: BlobBackend, path: Path, progress: Progress | None) -> Staged:
    """Copy+hash a file; hash only when a blob of the same size exists (a likely re-push).

    A remote backend's staging hashes and, for a large new blob, starts sending its parts
    beside the validation; the object appears only at `make_durable`."""
    if not blobs.remote and _has_size(db, path.stat().st_size):
        st = blobs.stage_hash_only(path, progress)
        if blobs.exists(st.digest):
            return st
    return blobs.stage(path, progress)


class _BlobVanished(Exception):
    """A blob a push only hashed (the store had it) was removed before the push could record it."""

    def __init__(self, staged: Staged):
        super().__init__(str(staged.source))
        self.staged = staged


def _publish(s, blobs: BlobBackend, staged: list[Staged]) -> None:
    """Publish staged blobs under their digests and record them (inside the write transaction;
    a remote backend re-checks each blob here and uploads again what a gc removed)."""
    for st in staged:
        if not blobs.remote and st.tmp is None and not blobs.exists(st.digest):
            raise _BlobVanished(st)
        blobs.publish(st)
        if s.get(Blob, st.digest) is None:
            s.add(Blob(digest=st.digest, size=st.size, created=_now()))


def _has_size(db: Database, size: int) -> bool:
    with db.read() as s:
        return s.scalar(select(Blob.digest).where(Blob.size == size).limit(1)) is not None


def _known_spec(db: Database, digest: str) -> dict[str, Any] | None:
    """The recorded spec of any version with exactly this content (validated when pushed)."""
    with db.read() as s:
        text = s.scalar(select(Version.spec).where(Version.digest == digest).limit(1))
    return json.loads(text) if text else None


def _now() -> datetime:
    return datetime.now(timezone.utc)
