"""The content-addressed blob directory.

Layout under the root: `sha256/<2 hex>/<64 hex>` for blobs (read-only files) and
`tmp/` for writes in flight. A blob is written once: copied into a temp file while
being hashed (`registry.copying`: one read of the source), fsynced, then renamed to its
digest's path, and the directory fsynced. Every read re-hashes and refuses bytes that do
not match their name.

Each temp file is held under an exclusive `flock` by its writer for its whole life,
so `gc` can tell leftovers of a killed writer (lock free) from a write in progress.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from registry.blob_backend import BlobEntry, CheckResult
from registry.copying import Progress, copy_hashing, fsync_dir, hash_file
from registry.digests import hex_of, is_digest, sha256_name
from registry.errors import IntegrityError, RegistryError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]


@dataclass
class Staged:
    """A source file hashed and (unless `tmp` is None) copied into a locked temp file."""

    source: Path
    digest: str
    size: int
    tmp: Path | None = None
    fd: int | None = None


def missing(digest: str) -> str:
    """The problem line of a blob that is not there (verify re-checks those under the writer lock)."""
    return f"blob {digest} is missing"


class BlobStore:
    """Blobs under one directory; see the module docstring for the write protocol."""

    remote = False
    sweep_grace_s = 0.0  # publishing happens inside the write transaction: no race with gc

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)
        self.objects = self.root / "sha256"
        self.tmpdir = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ addressing
    def path(self, digest: str) -> Path:
        h = hex_of(digest)
        return self.objects / h[:2] / h

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    # ------------------------------------------------------------------ writing
    def _new_tmp(self) -> tuple[Path, int]:
        tmp = self.tmpdir / f"{os.getpid()}-{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        return tmp, fd

    def stage(self, source: Path, progress: Progress | None = None) -> Staged:
        """Copy `source` into a locked temp file while hashing it (fsynced, not yet visible).

        The fsync overlaps the end of the hashing (see `copy_hashing`); `make_durable` still syncs
        before anything is published, which then costs next to nothing.
        """
        tmp, fd = self._new_tmp()
        try:
            with open(source, "rb", buffering=0) as src, os.fdopen(os.dup(fd), "wb", buffering=0) as dst:
                before = os.fstat(src.fileno())
                digest, size = copy_hashing(src, dst, progress, sync=True)
                after = os.stat(source)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != before.st_size:
                raise RegistryError(f"{source}: changed while it was being pushed; push it again")
        except BaseException:
            self._drop(tmp, fd)
            raise
        return Staged(source, digest, size, tmp, fd)

    def stage_hash_only(self, source: Path, progress: Progress | None = None) -> Staged:
        """Hash `source` without copying (for content the store probably holds already)."""
        digest, size = hash_file(source, progress)
        return Staged(source, digest, size)

    def make_durable(self, staged: Staged) -> None:
        """fsync a staged temp file (done before the database transaction, outside its lock)."""
        if staged.fd is not None:
            os.fsync(staged.fd)

    def publish(self, staged: Staged) -> bool:
        """Rename a durable temp file to its digest path. Returns True if a new blob appeared.

        If the blob already exists, the temp file is dropped (content addressing: same bytes).
        """
        final = self.path(staged.digest)
        if final.is_file():
            self.discard(staged)
            return False
        if staged.tmp is None:
            raise RegistryError(f"{staged.source}: content {staged.digest} is not in the store")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.tmp, 0o444)
        os.replace(staged.tmp, final)
        fsync_dir(final.parent)
        self._release(staged)
        return True

    def discard(self, staged: Staged) -> None:
        if staged.tmp is not None:
            self._drop(staged.tmp, staged.fd)
            staged.tmp = None
            staged.fd = None

    def _release(self, staged: Staged) -> None:
        if staged.fd is not None:
            os.close(staged.fd)
        staged.fd = None
        staged.tmp = None

    @staticmethod
    def _drop(tmp: Path, fd: int | None) -> None:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ reading
    def copy_verified(self, digest: str, dest: Path, progress: Progress | None = None) -> int:
        """Copy blob `digest` to `dest` (created), hashing while copying; raise if altered."""
        src_path = self.path(digest)
        try:
            src = open(src_path, "rb", buffering=0)
        except FileNotFoundError:
            raise IntegrityError(f"blob {digest} is missing from {self.objects}") from None
        with src, open(dest, "wb", buffering=0) as dst:
            got, size = copy_hashing(src, dst, progress, sync=True)  # fsynced, overlapping the hash
        if got != digest:
            dest.unlink()
            raise IntegrityError(f"blob {digest} is corrupt (its bytes hash to {got})")
        return size

    def check_blob(self, digest: str, size: int, *, full: bool = True,
                   progress: Progress | None = None) -> CheckResult:
        """Local blobs are always re-read in full (a local read is as cheap as it gets)."""
        problem = self.check(digest, progress)
        return CheckResult(problem, 0 if problem and "missing" in problem else size)

    def check(self, digest: str, progress: Progress | None = None) -> str | None:
        """None if blob `digest` is present and intact, else a one-line problem (`missing(...)` for
        a blob that is not there)."""
        if not is_digest(digest):
            return f"blob {digest!r}: malformed digest (expected sha256: and 64 hex digits)"
        p = self.path(digest)
        try:
            got, _ = hash_file(p, progress)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return missing(digest)
        if got != digest:
            return f"blob {digest} is altered (its bytes hash to {got})"
        return None

    # ------------------------------------------------------------------ scanning
    def iter_digests(self) -> Iterator[tuple[str, int]]:
        """Every blob file on disk as (digest, size)."""
        for sub in sorted(self.objects.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if len(f.name) == 64:
                    yield sha256_name(f.name), f.stat().st_size

    def iter_blobs(self) -> Iterator[BlobEntry]:
        """Every blob file on disk with its size and modification time."""
        for digest, _ in self.iter_digests():
            try:
                st = self.path(digest).stat()
            except FileNotFoundError:
                continue
            yield BlobEntry(digest, st.st_size, st.st_mtime)

    def remove_leftover(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(name).unlink()

    def leftovers(self, older_than_s: float = 0.0) -> Iterator[tuple[Path, int]]:
        """Temp files whose writer is gone (their lock is free): (path, size)."""
        for f in sorted(self.tmpdir.iterdir()):
            try:
                fd = os.open(f, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer holds it
                yield f, os.fstat(fd).st_size
            finally:
                os.close(fd)

    def remove(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()
