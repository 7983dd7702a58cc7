"""The content-addressed blob directory.

Layout under the root: `sha256/<2 hex>/<64 hex>` for blobs (read-only files) and
`tmp/` for writes in flight. A blob is written once: copied into a temp file while
being hashed (one read of the source; hashing and writing overlap in two threads),
fsynced, then renamed to its digest's path, and the directory fsynced. Every read
re-hashes and refuses bytes that do not match their name.

Each temp file is held under an exclusive `flock` by its writer for its whole life,
so `gc` can tell leftovers of a killed writer (lock free) from a write in progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from registry.errors import IntegrityError, RegistryError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

CHUNK = 1024 * 1024  # 1 MiB: stays in CPU cache between read, hash and write (8 MiB is ~2x slower)
SYNC_EVERY = 128 * 1024 * 1024
Progress = Callable[[int], None]  # called with the number of bytes just processed


def sha256_name(hexdigest: str) -> str:
    return "sha256:" + hexdigest


def hex_of(digest: str) -> str:
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise RegistryError(f"malformed digest {digest!r}")
    return digest[7:]


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(dst, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += dst.write(view[done:])


def _pump(src, dst, progress: Progress | None) -> tuple[str, int]:
    """Copy src -> dst (dst may be None: hash only), hashing each chunk while it is written.

    Regular files are memory-mapped: the hash reads the mapped pages and `write` copies
    them straight into the destination, so bytes are copied once, as by a plain copy.
    Three things overlap: the main thread writes, one thread hashes the chunk being
    written, and another flushes what is already written (fdatasync every SYNC_EVERY
    bytes), so dirty pages never pile up into write throttling and the final fsync only
    waits for the tail. (A source truncated by someone else mid-copy kills the process
    with SIGBUS; nothing is published in that case.)
    """
    try:
        size = os.fstat(src.fileno()).st_size
        mm = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except (OSError, ValueError, AttributeError):
        mm = None
    if mm is None:
        return _pump_chunks(iter(lambda: _read_chunk(src), None), dst, progress)
    try:
        with contextlib.suppress(AttributeError, OSError):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        mv = memoryview(mm)
        try:
            return _pump_chunks((mv[o:o + CHUNK] for o in range(0, size, CHUNK)), dst, progress)
        finally:
            mv.release()
    finally:
        with contextlib.suppress(BufferError):
            mm.close()


def _read_chunk(src) -> memoryview | None:
    buf = bytearray(CHUNK)
    n = src.readinto(buf)
    return memoryview(buf)[:n] if n else None


def _pump_chunks(chunks, dst, progress: Progress | None) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    synced = 0
    sync_future = None
    with ThreadPoolExecutor(2) as pool:
        pending = None
        for view in chunks:
            n = len(view)
            if dst is None:
                h.update(view)
            else:
                if pending is not None:
                    pending.result()  # hashes stay in order
                pending = pool.submit(h.update, view)  # hashlib releases the GIL on big buffers
                _write_all(dst, view)
                if total + n - synced >= SYNC_EVERY and (sync_future is None or sync_future.done()):
                    if sync_future is not None:
                        sync_future.result()
                    sync_future = pool.submit(os.fdatasync, dst.fileno())
                    synced = total + n
            total += n
            if progress:
                progress(n)
            view = None  # noqa: PLW2901 - drop the mapped slice before the map closes
        if pending is not None:
            pending.result()
            pending = None
        if sync_future is not None:
            sync_future.result()
    return sha256_name(h.hexdigest()), total


SEND = 16 * 1024 * 1024


def _hash_mapped(mm: mmap.mmap, size: int) -> str:
    h = hashlib.sha256()
    mv = memoryview(mm)
    try:
        for o in range(0, size, CHUNK):
            h.update(mv[o:o + CHUNK])
    finally:
        mv.release()
    return sha256_name(h.hexdigest())


def _copy(src, dst, progress: Progress | None, sync: bool = False) -> tuple[str, int]:
    """Copy src -> dst and return (digest, size), reading the source once.

    Linux: the kernel copies (sendfile, as a plain `cp` does) while a second thread hashes
    the same pages through a read-only mapping; elsewhere, or if that is refused, the
    chunked `_pump`. Either way no byte is read twice from storage.

    With `sync`, dst is also fsynced before returning. The kernel copy is about twice as
    fast as the hash, so the fsync starts as soon as the copy is done and runs while the
    hash finishes: the write-back overlaps the hashing instead of following it (on a
    1 GiB file this is the difference between copy+fsync and hash+fsync in a row and
    about the time of a plain copy).
    """
    size = os.fstat(src.fileno()).st_size
    if size == 0 or not hasattr(os, "sendfile"):
        return _pump_synced(src, dst, progress, sync)
    try:
        mm = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return _pump_synced(src, dst, progress, sync)
    fallback = False
    try:
        with contextlib.suppress(AttributeError, OSError):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        with ThreadPoolExecutor(2 if sync else 1) as pool:
            digest_future = pool.submit(_hash_mapped, mm, size)
            sync_future = None
            off = 0
            try:
                while off < size:
                    n = os.sendfile(dst.fileno(), src.fileno(), off, min(SEND, size - off))
                    if n == 0:
                        raise RegistryError(f"{src.name}: shorter than it was a moment ago (changed while copied)")
                    off += n
                    if progress:
                        progress(n)
            except OSError:
                if off:
                    raise
                fallback = True  # sendfile refused between these files: copy by hand
            if sync and not fallback:
                sync_future = pool.submit(os.fsync, dst.fileno())  # write-back overlaps the hash
            digest = digest_future.result()
            if sync_future is not None:
                sync_future.result()
    finally:
        with contextlib.suppress(BufferError):
            mm.close()
    if fallback:
        src.seek(0)
        dst.seek(0)
        dst.truncate()
        return _pump_synced(src, dst, progress, sync)
    return digest, size


def _pump_synced(src, dst, progress: Progress | None, sync: bool) -> tuple[str, int]:
    result = _pump(src, dst, progress)
    if sync:
        os.fsync(dst.fileno())
    return result


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """(digest, size) of a file, one sequential read."""
    with open(path, "rb", buffering=0) as fh:
        return _pump(fh, None, progress)


@dataclass
class Staged:
    """A source file hashed and (unless `tmp` is None) copied into a locked temp file."""

    source: Path
    digest: str
    size: int
    tmp: Path | None = None
    fd: int | None = None


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
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

        The fsync overlaps the end of the hashing (see `_copy`); `make_durable` still syncs
        before anything is published, which then costs next to nothing.
        """
        tmp, fd = self._new_tmp()
        try:
            with open(source, "rb", buffering=0) as src, os.fdopen(os.dup(fd), "wb", buffering=0) as dst:
                before = os.fstat(src.fileno())
                digest, size = _copy(src, dst, progress, sync=True)
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
            got, size = _copy(src, dst, progress, sync=True)  # fsynced, overlapping the hash
        if got != digest:
            dest.unlink()
            raise IntegrityError(f"blob {digest} is corrupt (its bytes hash to {got})")
        return size

    def check(self, digest: str, progress: Progress | None = None) -> str | None:
        """None if blob `digest` is present and intact, else a one-line problem."""
        p = self.path(digest)
        if not p.is_file():
            return f"blob {digest} is missing"
        got, _ = hash_file(p, progress)
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

    def leftovers(self) -> Iterator[tuple[Path, int]]:
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
