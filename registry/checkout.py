"""Writing a version back out as a PEFT folder: `pull` (to a folder the user names, audited)
and `materialize` (a cached folder under the home, re-verified on each call).

Every byte comes from a blob re-hashed while it is copied; the folder is written beside its
target and renamed into place, so it appears complete or not at all.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from registry import audit, refs
from registry.blob_backend import BlobBackend
from registry.copying import Progress, fsync_dir, hash_file
from registry.db import Database
from registry.errors import RegistryError
from registry.info import VersionInfo

CACHE = "cache"
TMP_MARK = ".tmp-"  # `.<folder>.tmp-<pid>-<random>`: gc removes those whose process is gone


def pull(db: Database, blobs: BlobBackend, ref: str, out: str | Path | None = None,
         progress: Progress | None = None) -> Path:
    """Write the version's PEFT folder to `out` (default ./<name>-<N>), verifying every digest."""
    info = refs.resolve(db, ref)
    dest = Path(out) if out is not None else Path.cwd() / f"{info.name.replace('/', '_')}-{info.number}"
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(f"{dest}: already exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_folder(blobs, info, dest, progress)
    audit.record(db, "pull", info.ref, {"digest": info.digest, "to": str(dest.resolve())}, name=info.name)
    return dest


def materialize(db: Database, blobs: BlobBackend, home: Path, ref: str) -> Path:
    """A verified PEFT folder for `ref`, cached under the home and re-verified on each call."""
    info = refs.resolve(db, ref)
    cache = home / CACHE / info.digest[7:]
    if cache.is_dir():
        if all((cache / f["path"]).is_file() and hash_file(cache / f["path"])[0] == f["digest"]
               for f in info.files or []):
            return cache
        shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_folder(blobs, info, cache)
    except OSError:
        if not cache.is_dir():  # another process won the rename race: fine if it is there
            raise
    return cache


def write_folder(blobs: BlobBackend, info: VersionInfo, dest: Path, progress: Progress | None = None) -> None:
    """Copy a version's verified blobs into a temp folder beside `dest`, then rename it there."""
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for f in info.files or []:
            blobs.copy_verified(f["digest"], tmp / f["path"], progress)
        fsync_dir(tmp)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
