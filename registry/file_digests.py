"""Cached digests of local files (git's index idea): a file is hashed once, and again only
when its identity changes.

The cache maps an absolute path to the identity the file had when it was hashed (size,
mtime_ns, ctime_ns, inode) and its `sha256:` digest. A lookup stats the file; the cached
digest is used only if all four are unchanged, else the file is hashed again. So merging onto
the same base a second time reads no base byte: the digests come from one query.

Guards, as in git: a file stamped (mtime or ctime) less than one timestamp tick before its
hashing began is hashed but not cached, since a write in that same tick would leave the
stamps unchanged; the tick is taken as COARSE_NS on filesystems whose stamps are whole
seconds (FAT, ext3, HFS+) and FINE_NS elsewhere. A file whose identity changes while it is
being hashed is an error. ctime is part of the identity because it cannot be set back (a
copy that restores mtime still changes it).

The cache logic (`pending_digests`, `PendingDigests`) takes the store's query and write as
functions and imports nothing of SQLAlchemy: a merge that registers through a separate
process (`registry.worker`) stats and hashes here and only asks that process for the rows.
Only `lookup`, `prune` and the storing step touch the database.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.copying import Progress, hash_file
from registry.errors import RegistryError

if TYPE_CHECKING:
    from registry.db import Database

COARSE_NS = 2_000_000_000  # whole-second stamps: FAT's are 2 s apart
FINE_NS = 50_000_000  # ns stamps taken from the kernel's coarse clock (a jiffy: 1-10 ms)
BATCH = 500  # paths per IN (...) lookup


@dataclass(frozen=True)
class Identity:
    """What must be unchanged for a cached digest to still describe a file's bytes."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    def racy(self, hashed_ns: int) -> bool:
        """True if a write in the tick before `hashed_ns` could leave these stamps unchanged."""
        coarse = self.mtime_ns % 1_000_000_000 == 0 and self.ctime_ns % 1_000_000_000 == 0
        return hashed_ns - max(self.mtime_ns, self.ctime_ns) < (COARSE_NS if coarse else FINE_NS)

    def to_json(self) -> list[int]:
        return [self.size, self.mtime_ns, self.ctime_ns, self.inode]

    @classmethod
    def from_json(cls, v: Sequence[int]) -> Identity:
        size, mtime_ns, ctime_ns, inode = (int(x) for x in v)
        return cls(size, mtime_ns, ctime_ns, inode)

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        ino = st.st_ino if st.st_ino < 1 << 63 else st.st_ino - (1 << 64)  # fits a signed BIGINT
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, ino)


@dataclass(frozen=True)
class HashedFile:
    """A digest just taken, to be cached: the file's resolved path (the key), its identity
    when hashed, the digest and when. `to_json`/`from_json` carry it between processes."""

    path: str
    identity: Identity
    digest: str
    hashed: datetime

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "identity": self.identity.to_json(), "digest": self.digest,
                "hashed": self.hashed.isoformat()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HashedFile:
        return cls(str(d["path"]), Identity.from_json(d["identity"]), str(d["digest"]),
                   datetime.fromisoformat(d["hashed"]))


Cached = dict[str, tuple[Identity, str]]  # resolved path -> (identity when hashed, digest)
CachedQuery = Callable[[list[str]], Cached]
Record = Callable[[list[HashedFile]], None]


def file_digests(db: Database, paths: Sequence[str | Path], progress: Progress | None = None) -> dict[str, str]:
    """{file name: `sha256:<hex>`} for `paths`, in their order, hashing only files whose cached
    identity does not match. File names must be distinct (they are the keys)."""
    pending = lookup(db, paths)
    pending.hash(progress)
    return pending.finish(recorder(db))


class Cancelled(RegistryError):
    """`PendingDigests.hash` was stopped by `cancel()`."""


@dataclass
class PendingDigests:
    """One `file_digests` answer in three steps, so that the hashing may run on another thread
    while the caller alone keeps the store handle: `pending_digests` (one query), `hash()`
    (reads files, never the database; any thread), `finish(record)` (records what was hashed,
    returns all). A merge starts the hashing before it imports torch, so the two overlap."""

    names: list[str]
    known: dict[str, str]
    todo: list[tuple[Path, str, Identity]]
    fresh: list[HashedFile] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def hash(self, progress: Progress | None = None) -> None:
        """Hash every file the cache did not answer; RegistryError if one changes meanwhile,
        `Cancelled` once `cancel()` was called (checked every buffer)."""
        def step(n: int) -> None:
            if self._stop.is_set():
                raise Cancelled("file hashing cancelled")
            if progress:
                progress(n)

        for p, key, ident in self.todo:
            started = time.time_ns()
            digest, size = hash_file(p, step)
            if Identity.of(_stat(p)) != ident or size != ident.size:
                raise RegistryError(f"{p}: changed while it was being hashed; try again")
            self.known[p.name] = digest
            if not ident.racy(started):
                self.fresh.append(HashedFile(key, ident, digest, datetime.now(timezone.utc)))
        self.todo = []

    def cancel(self) -> None:
        """Stop a `hash()` running in another thread at its next buffer."""
        self._stop.set()

    def finish(self, record: Record | None) -> dict[str, str]:
        """Hand the fresh digests to `record` (None: cache them nowhere) and return
        {name: digest} in order."""
        if self.todo:
            raise RegistryError("file digests: hash() has not finished")
        if self.fresh and record is not None:
            record(self.fresh)
        self.fresh = []
        return {n: self.known[n] for n in self.names}


def lookup(db: Database | None, paths: Sequence[str | Path]) -> PendingDigests:
    """Stat `paths` and take what the cache of `db` answers (None: a store that does not exist
    yet answers nothing); the rest is left for `PendingDigests.hash`."""
    return pending_digests(paths, (lambda keys: cached(db, keys)) if db is not None else None)


def pending_digests(paths: Sequence[str | Path], query: CachedQuery | None) -> PendingDigests:
    """Stat `paths` and take what `query` (resolved paths -> cached rows; None: no cache)
    answers for them; the rest is left for `PendingDigests.hash`."""
    given = [Path(p) for p in paths]
    names = [p.name for p in given]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RegistryError(f"file digests: two paths end in the same file name {dup!r}")
    keys = [str(p.resolve()) for p in given]
    idents = [Identity.of(_stat(p)) for p in given]
    answers = query(keys) if query is not None else {}
    known: dict[str, str] = {}
    todo: list[tuple[Path, str, Identity]] = []
    for p, key, ident in zip(given, keys, idents):
        hit = answers.get(key)
        if hit is not None and hit[0] == ident:
            known[p.name] = hit[1]
        else:
            todo.append((p, key, ident))
    return PendingDigests(names, known, todo)


def prune(s) -> int:
    """Forget entries whose file is gone or changed (inside the caller's write transaction)."""
    from sqlalchemy import select

    from registry.models import FileDigest

    gone = 0
    for row in s.scalars(select(FileDigest)).all():
        try:
            ident = Identity.of(os.stat(row.path))
        except OSError:
            ident = None
        if ident != Identity(row.size, row.mtime_ns, row.ctime_ns, row.inode):
            s.delete(row)
            gone += 1
    return gone


def _stat(p: Path) -> os.stat_result:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise RegistryError(f"{p}: file not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise RegistryError(f"{p}: not a regular file")
    return st


def cached(db: Database, keys: list[str]) -> Cached:
    """The cache rows of `db` for these resolved paths (one query per BATCH)."""
    from sqlalchemy import select

    from registry.models import FileDigest

    out: Cached = {}
    with db.read() as s:
        for i in range(0, len(keys), BATCH):
            for row in s.scalars(select(FileDigest).where(FileDigest.path.in_(keys[i:i + BATCH]))):
                out[row.path] = (Identity(row.size, row.mtime_ns, row.ctime_ns, row.inode), row.digest)
    return out


def recorder(db: Database) -> Record:
    """`PendingDigests.finish`'s step that caches fresh digests in `db` (`store`)."""
    return lambda rows: store(db, rows)


def store(db: Database, rows: list[HashedFile]) -> None:
    """Insert or replace entries. Best effort: a store that cannot be written (read-only home,
    a role without INSERT) still answers, it only hashes again next time."""
    from sqlalchemy.exc import DBAPIError

    from registry.models import FileDigest

    try:
        with db.writing() as s:
            for row in rows:
                i = row.identity
                s.merge(FileDigest(path=row.path, size=i.size, mtime_ns=i.mtime_ns, ctime_ns=i.ctime_ns,
                                   inode=i.inode, digest=row.digest, hashed=row.hashed))
    except DBAPIError:
        pass
