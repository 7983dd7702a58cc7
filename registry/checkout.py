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

from registry import audit, modes, refs
from registry.blob_backend import BlobBackend
from registry.copying import Progress, fsync_dir, hash_file
from registry.db import Database
from registry.digests import hex_of, is_digest, manifest_digest
from registry.errors import IntegrityError, RegistryError
from registry.info import VersionInfo
from registry.paths import check_file_name, join_inside

CACHE = "cache"
TMP_MARK = ".tmp-"  # `.<folder>.tmp-<pid>-<random>`: gc removes those whose process is gone


def pull(db: Database, blobs: BlobBackend, ref: str, out: str | Path | None = None,
         progress: Progress | None = None) -> Path:
    """Write the version's PEFT folder to `out` (default ./<name>-<N>), verifying every digest."""
    info = checked(refs.resolve(db, ref))
    dest = Path(out) if out is not None else Path.cwd() / f"{info.name.replace('/', '_')}-{info.number}"
    if dest.exists() or dest.is_symlink():  # every output: a new path, never an existing one
        raise RegistryError(f"{dest}: already exists (an empty folder too); give a new path: "
                            "the folder appears there, complete, in one rename")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_folder(blobs, info, dest, progress)
    audit.record(db, "pull", info.ref, {"digest": info.digest, "to": str(dest.resolve())}, name=info.name)
    return dest


def materialize(db: Database, blobs: BlobBackend, home: Path, ref: str) -> Path:
    """A verified PEFT folder for `ref`, cached under the home and re-verified on each call.

    The cache folder is named by the version's digest, checked first (`sha256:` + 64 hex) and
    recomputed from the file list, so no stored string ever names the folder that is removed.
    """
    info = checked(refs.resolve(db, ref))
    cache = home / CACHE / hex_of(info.digest)
    if cache.is_dir():
        if all(_cached_ok(cache, f) for f in info.files or []):
            return cache
        shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_folder(blobs, info, cache)
    except OSError:
        if not cache.is_dir():  # another process won the rename race: fine if it is there
            raise
    return cache


def checked(info: VersionInfo) -> VersionInfo:
    """`info` if its stored file list is safe to write out and adds up to its digest.

    Each path must be a plain file name and each digest well formed (`registry.paths`,
    `registry.digests`): the rows may have been written by someone else. IntegrityError
    otherwise, before anything is written.
    """
    files = {}
    for f in info.files or []:
        check_file_name(f["path"], f"{info.ref}: stored file name", IntegrityError)
        if not is_digest(f["digest"]):
            raise IntegrityError(f"{info.ref}: stored file {f['path']} has a malformed digest {f['digest']!r}")
        files[f["path"]] = f["digest"]
    if not is_digest(info.digest):
        raise IntegrityError(f"{info.ref}: malformed digest {info.digest!r} (expected sha256: and 64 hex digits)")
    if manifest_digest(files) != info.digest:
        raise IntegrityError(f"{info.ref}: its stored files do not add up to its digest {info.digest[:19]}... "
                             "(the store was altered; run `adapters verify`)")
    return info


def _cached_ok(cache: Path, f: dict) -> bool:
    p = join_inside(cache, f["path"], "cached file", IntegrityError)
    return p.is_file() and not p.is_symlink() and hash_file(p)[0] == f["digest"]


def write_folder(blobs: BlobBackend, info: VersionInfo, dest: Path, progress: Progress | None = None) -> None:
    """Copy a version's verified blobs into a temp folder beside `dest`, then rename it there.

    Each file gets the permission bits recorded at push (0600 for rows without one), within
    the umask; the folder is private when any file is (`registry.modes`).
    """
    info = checked(info)
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)
    try:
        file_modes = []
        for f in info.files or []:
            target = join_inside(tmp, f["path"], f"{info.ref}: stored file name", IntegrityError)
            blobs.copy_verified(f["digest"], target, progress)
            mode = modes.common_mode([f.get("mode") if f.get("mode") is not None else modes.LEGACY_FILE_MODE])
            os.chmod(target, mode)
            file_modes.append(mode)
        os.chmod(tmp, modes.folder_mode(modes.common_mode(file_modes)))
        fsync_dir(tmp)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
