"""Where a store lives and who acts on it, from arguments or the environment.

- home: the argument, else $ADAPTERS_HOME, else the user data dir (created if missing, 0700,
  by commands that write; a reading command on a missing home says so and creates nothing);
- database URL: the argument, else $ADAPTERS_DB_URL, else SQLite in the home;
- actor (recorded in versions and audit events): $ADAPTERS_ACTOR, else user@host.
"""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path

from registry.errors import RegistryError, StoreMissing
from registry.modes import create_db_file, make_home

MAX_ACTOR = 200
SQLITE_NAME = "registry.db"


def resolve_home(home: str | Path | None = None, create: bool = True) -> Path:
    """The home directory: `home`, else $ADAPTERS_HOME, else the user data dir.

    `create`: make it (private, see `registry.modes`) when missing; otherwise a missing home
    raises `StoreMissing` and nothing is created (a mistyped `--home` must not become a store).
    """
    if home is None:
        home = os.environ.get("ADAPTERS_HOME")
    if not home:
        import platformdirs

        home = platformdirs.user_data_dir("adapters", appauthor=False)
    home = Path(home).expanduser()
    if not create:
        if not home.is_dir():
            raise StoreMissing(f"{home}: no registry there (the folder does not exist; "
                               "`adapters push` creates one)")
        return home
    try:
        make_home(home)
    except OSError as exc:
        raise RegistryError(f"{home}: cannot create the registry home ({exc.strerror})") from None
    return home


def sqlite_file(home: Path, create: bool) -> Path:
    """The embedded database file in `home`: created private (`registry.modes`) when `create`,
    else `StoreMissing` if it is not there."""
    path = home / SQLITE_NAME
    if create:
        create_db_file(path)
    elif not path.is_file():
        raise StoreMissing(f"{home}: no registry there (no {SQLITE_NAME}; `adapters push` creates one)")
    return path


def resolve_url(home: Path, db_url: str | None = None) -> str:
    """The database URL: `db_url`, else $ADAPTERS_DB_URL, else SQLite in the home."""
    return db_url or os.environ.get("ADAPTERS_DB_URL") or f"sqlite:///{home / SQLITE_NAME}"


def actor() -> str:
    """`ADAPTERS_ACTOR`, else user@host (at most 200 characters)."""
    env = os.environ.get("ADAPTERS_ACTOR")
    if env:
        return env[:MAX_ACTOR]
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"[:MAX_ACTOR]
