"""File modes: a private store by default, and outputs no more open than their sources.

- The registry home is created `0700` and its SQLite database `0600` (SQLite gives its
  `-wal`/`-shm` files the database's mode), so adapters and the audit log are private to
  their owner. A team that shares one home through a group sets `ADAPTERS_HOME_MODE`
  (octal, e.g. `0750`): the home gets that mode and the database the same without the
  execute bits. Only what the registry creates is affected; an existing home is left as is.
- Blobs are read-only (`0444`) inside that home.
- A pulled or merged file gets the permission bits common to all its sources (a bitwise
  AND: one `0600` source makes the output `0600`), never more than the umask allows, and
  never execute bits; its folder is `0700` unless those bits let the group/others read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from registry.errors import RegistryError

HOME_MODE_ENV = "ADAPTERS_HOME_MODE"
DEFAULT_HOME_MODE = 0o700
LEGACY_FILE_MODE = 0o600  # a stored file whose mode was not recorded: the private choice


def home_mode() -> int:
    """The mode of a home the registry creates: $ADAPTERS_HOME_MODE (octal) or 0700."""
    text = os.environ.get(HOME_MODE_ENV)
    if not text:
        return DEFAULT_HOME_MODE
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0o700 <= mode <= 0o777 or mode & 0o700 != 0o700:
        raise RegistryError(f"{HOME_MODE_ENV}={text!r}: expected an octal mode from 0700 to 0777 "
                            "that keeps the owner's rwx (e.g. 0750)")
    return mode


def db_file_mode() -> int:
    """The database file's mode: the home's without execute bits (0600 by default)."""
    return home_mode() & 0o666


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_home(path: Path) -> None:
    """Create the home (and missing parents) with `home_mode()`; an existing one is left alone."""
    path = Path(path)
    if path.is_dir():
        return
    mode = home_mode()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask; this is the configured mode


def create_db_file(path: Path) -> None:
    """Create an empty SQLite database file with `db_file_mode()` unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, db_file_mode())
    except FileExistsError:
        return
    os.fchmod(fd, db_file_mode())
    os.close(fd)


def common_mode(modes: Iterable[int]) -> int:
    """The permission bits every source has (AND), without execute, within the umask."""
    out = 0o666
    for m in modes:
        out &= m
    return out & 0o666 & ~current_umask()


def mode_of_files(paths: Iterable[Path]) -> int:
    """`common_mode` of existing files' modes."""
    return common_mode(os.stat(p).st_mode & 0o777 for p in paths)


def folder_mode(file_mode: int) -> int:
    """The folder mode that goes with files of `file_mode`: 0700 plus read+search where they are readable."""
    readable = file_mode & 0o044
    return 0o700 | readable | (readable >> 2)


def apply_modes(folder: Path, file_mode: int) -> None:
    """chmod every file under `folder` to `file_mode` and every folder to `folder_mode(file_mode)`."""
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, folder_mode(file_mode) if p.is_dir() else file_mode)
    os.chmod(folder, folder_mode(file_mode))
