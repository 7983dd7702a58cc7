"""Where a store lives and who acts on it, from arguments or the environment.

- home: the argument, else $ADAPTERS_HOME, else the user data dir (created if missing);
- database URL: the argument, else $ADAPTERS_DB_URL, else SQLite in the home;
- actor (recorded in versions and audit events): $ADAPTERS_ACTOR, else user@host.
"""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path

from registry.errors import RegistryError

MAX_ACTOR = 200


def resolve_home(home: str | Path | None = None) -> Path:
    """The home directory: `home`, else $ADAPTERS_HOME, else the user data dir (created)."""
    if home is None:
        home = os.environ.get("ADAPTERS_HOME")
    if not home:
        import platformdirs

        home = platformdirs.user_data_dir("adapters", appauthor=False)
    home = Path(home).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistryError(f"{home}: cannot create the registry home ({exc.strerror})") from None
    return home


def resolve_url(home: Path, db_url: str | None = None) -> str:
    """The database URL: `db_url`, else $ADAPTERS_DB_URL, else SQLite in the home."""
    return db_url or os.environ.get("ADAPTERS_DB_URL") or f"sqlite:///{home / 'registry.db'}"


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
