"""A bounded, local read-through cache of remote blobs (in the home, `blob-cache/`).

Entries are files named by digest (`sha256/<2 hex>/<64 hex>`), read-only, written by
a copy into a temp file and a rename. Nothing is trusted: every read from the cache
re-hashes the bytes (the same verified copy as the local backend), and an entry that
does not match its name is dropped and fetched again. The cache is a copy of the
bucket, never the only copy, so trimming it (least recently used first: a hit touches
the entry's mtime) loses nothing; `gc` trims it to its bound and drops entries no
version references.

Bound: `ADAPTERS_BLOB_CACHE_SIZE` (bytes, or with a unit like `20GB`; default 10 GiB;
0 disables the cache). A blob larger than a quarter of the bound is not cached.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from registry.blobs import BlobStore
from registry.copying import Progress
from registry.digests import sha256_name
from registry.errors import IntegrityError, RegistryError

DEFAULT_MAX_BYTES = 10 * 1024**3
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """`20GB`, `512MiB`, `1048576` -> bytes (a RegistryError names a bad value)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = t[len(num):].strip()
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise RegistryError(f"ADAPTERS_BLOB_CACHE_SIZE={text!r}: expected a size such as 20GB or 0") from None
    if value < 0:
        raise RegistryError(f"ADAPTERS_BLOB_CACHE_SIZE={text!r}: must not be negative")
    return int(value)


def cache_bound() -> int:
    env = os.environ.get("ADAPTERS_BLOB_CACHE_SIZE")
    return DEFAULT_MAX_BYTES if not env else parse_size(env)


class BlobCache:
    """Read-through cache: `get` (verified) / `put` / `trim` / `entries`."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.store = BlobStore(root)
        self.max_bytes = cache_bound() if max_bytes is None else max_bytes

    def fits(self, size: int) -> bool:
        return self.max_bytes > 0 and size * 4 <= self.max_bytes

    def get(self, digest: str, dest: Path, progress: Progress | None = None) -> int | None:
        """Copy a cached blob to `dest` verifying it; None on a miss (or a bad entry, dropped)."""
        path = self.store.path(digest)
        if not path.is_file():
            return None
        try:
            size = self.store.copy_verified(digest, dest, progress)
        except (IntegrityError, FileNotFoundError):
            self.store.remove(digest)  # damaged or trimmed meanwhile: fetch again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used goes first
        return size

    def put(self, digest: str, source: Path) -> None:
        """Add a copy of `source` (already verified as `digest`), then trim to the bound."""
        size = source.stat().st_size
        if not self.fits(size) or self.store.exists(digest):
            return
        tmp = self.store.tmpdir / f"{os.getpid()}-{secrets.token_hex(8)}.part"
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o444)
            final = self.store.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            return  # a cache that cannot be written is only slower
        self.trim()

    def entries(self) -> list[tuple[str, int, float]]:
        """(digest, size, last use) of every entry, oldest use first."""
        out = []
        for e in self.store.iter_blobs():
            out.append((e.digest, e.size, e.modified))
        return sorted(out, key=lambda t: t[2])

    def trim(self, max_bytes: int | None = None, keep: set[str] | None = None,
             dry_run: bool = False) -> tuple[list[str], int]:
        """Drop entries not in `keep` (when given), then the least recently used until the
        total is within the bound. Returns (digests removed, bytes freed)."""
        bound = self.max_bytes if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed: list[str] = []
        freed = 0
        for digest, size, _ in entries:
            if (keep is not None and digest not in keep) or total > bound:
                if not dry_run:
                    self.store.remove(digest)
                removed.append(digest)
                freed += size
                total -= size
        return removed, freed


__all__ = ["BlobCache", "cache_bound", "parse_size", "sha256_name"]
