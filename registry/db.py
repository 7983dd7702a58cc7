"""Engines, sessions, the writer lock and schema state.

SQLite (embedded default): WAL, a long busy timeout, and write transactions opened
with `BEGIN IMMEDIATE` (engine option `write=True`), so concurrent writers queue on the
database lock instead of failing with "database is locked" when a read transaction
tries to upgrade. PostgreSQL: write transactions lock the single `registry_state` row.

The schema revision is checked with one cheap query against `SCHEMA_HEAD`; alembic is
imported only when an upgrade is actually needed, so `adapters list` never pays for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import RegistryError
from registry.models import State

# The newest migration in migrations/versions (a test checks this against alembic's head).
SCHEMA_HEAD = "0005_settings"
BUSY_TIMEOUT_S = 300


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    """An engine configured for safe concurrent use from several processes."""
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:
            mode = "IMMEDIATE" if conn.get_execution_options().get("write") else "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    try:
        return create_engine(url, pool_pre_ping=False)
    except Exception as exc:  # bad URL / missing driver: a user mistake
        raise RegistryError(f"database URL {url!r}: {exc}") from None


def lock_state(session: Session) -> State:
    """Take the writer lock: the state row (PostgreSQL: FOR UPDATE; SQLite: the IMMEDIATE
    transaction already holds the database lock). Every write transaction does this first."""
    return session.execute(select(State).where(State.id == 1).with_for_update()).scalar_one()


class Database:
    """One database: an engine, read sessions, and write transactions that hold the writer lock.

    Every change to the store goes through `writing()`, so writers are serialised (gap-free
    version numbers, a linear audit chain) on SQLite and PostgreSQL alike.
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.read = sessionmaker(self.engine)
        self.write = sessionmaker(self.engine.execution_options(write=True))

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """A write transaction holding the writer lock from its first statement; commits on exit."""
        with self.write() as s, s.begin():
            lock_state(s)
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The alembic revision stamped in the database, or None for an empty database."""
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError as exc:
        msg = str(exc.orig).lower()
        if "alembic_version" in msg and ("no such table" in msg or "does not exist" in msg):
            return None
        raise RegistryError(f"cannot open the registry database: {str(exc.orig).splitlines()[0]}") from None


def alembic_config(connection=None):
    """An alembic Config pointing at the `migrations` package (built in code, no ini file)."""
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def upgrade(engine: Engine, lock_path: Path | None = None) -> str | None:
    """Upgrade the schema to head; safe when several processes do it at once.

    Returns the revision before the upgrade (None for a fresh database).
    """
    from alembic import command

    lock = _file_lock(lock_path) if lock_path is not None else contextlib.nullcontext()
    with lock:
        before = current_revision(engine)
        if before == SCHEMA_HEAD:
            return before
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7310442)"))
                before = None
                if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is not None:
                    before = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                if before == SCHEMA_HEAD:
                    return before
            command.upgrade(alembic_config(conn), "head")
        return before


def ensure_schema(engine: Engine, *, auto: bool, lock_path: Path | None = None) -> None:
    """Make sure the schema is at head: upgrade when `auto` (or the database is empty)."""
    rev = current_revision(engine)
    if rev == SCHEMA_HEAD:
        return
    if auto or rev is None:
        upgrade(engine, lock_path)
        return
    raise RegistryError(
        f"registry database is at schema {rev}, this version needs {SCHEMA_HEAD}: "
        "run `adapters db upgrade`")
