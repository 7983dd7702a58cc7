"""Shared fixtures (builders of files live in tests/builders.py, the CLI runner in tests/cli_runner.py).

- `pg_server` (session): a real PostgreSQL server started on 127.0.0.1 from the Debian
  binaries (as the `postgres` user when running as root); skipped with a reason if absent.
- `db_url` (parametrised "sqlite" / "postgresql"): None for the embedded SQLite default,
  else the URL of a fresh, already-migrated PostgreSQL database for this test.
- `registry_home`, `reg`: a fresh home and a `Registry` opened on it with `db_url`.
- `make_adapter`: writes real LoRA/MoRA adapter folders (safetensors + adapter_config.json).
- `run_cli`: runs `adapters ...` in-process against the test's store (tests.cli_runner.invoke).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

_PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
_counter = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.getuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def pg_server():
    """Base URL (no database) of a throwaway PostgreSQL server, with a migrated template db."""
    if not _PG_BINS:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                    "(install the Debian 'postgresql' package; CI does)")
    bindir = Path(_PG_BINS[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="adapters-pg-"))
    data = root / "data"
    if os.getuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                                     "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                                     "-c max_connections=1000", "start"]), check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')[-500:]}")
    base = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    try:
        _admin(base, "CREATE DATABASE reg_template")
        from registry.db import make_engine, upgrade

        eng = make_engine(base + "/reg_template")
        upgrade(eng)
        eng.dispose()
        yield base
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _admin(base: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(base.replace("postgresql+psycopg://", "postgresql://") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(sql)


def fresh_pg_database(base: str) -> str:
    """A new database cloned from the migrated template; returns its URL."""
    name = f"t_{os.getpid()}_{next(_counter)}_{int(time.time() * 1000) % 100000}"
    _admin(base, f"CREATE DATABASE {name} TEMPLATE reg_template")
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request) -> str | None:
    """None (embedded SQLite in the home) or a fresh migrated PostgreSQL database URL."""
    if request.param == "sqlite":
        return None
    return fresh_pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def registry_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def reg(registry_home: Path, db_url: str | None):
    from registry.api import Registry

    r = Registry.open(home=registry_home, db_url=db_url)
    yield r
    r.close()


@pytest.fixture
def store_env(registry_home: Path, db_url: str | None) -> dict[str, str]:
    """Environment for `adapters` subprocesses pointing at the test's store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERS_")}
    env["ADAPTERS_HOME"] = str(registry_home)
    if db_url:
        env["ADAPTERS_DB_URL"] = db_url
    return env



@pytest.fixture
def make_adapter(tmp_path: Path):
    """make_adapter(name="a", **write_adapter kwargs) -> folder under tmp_path."""

    from tests.builders import write_adapter

    def make(name: str = "a", **kw) -> Path:
        return write_adapter(tmp_path / "src" / name, **kw)

    return make


@pytest.fixture
def run_cli(store_env: dict[str, str]):
    """run_cli("list", "--json") -> CliResult, in-process, against the test's store."""
    from tests.cli_runner import invoke

    return lambda *args: invoke(args, store_env)


def store_snapshot(home: Path, reg) -> tuple:
    """Everything a failed command must leave unchanged: blob files, temp files, rows, audit head."""
    from sqlalchemy import func, select

    from registry import models

    files = sorted(str(p.relative_to(home)) for p in (home / "blobs").rglob("*") if p.is_file())
    with reg._read() as s:
        counts = tuple(s.scalar(select(func.count()).select_from(t)) for t in
                       (models.Version, models.VersionFile, models.Blob, models.Alias, models.AuditEvent,
                        models.Name, models.Artifact))
        head = s.get(models.State, 1).audit_head
    return files, counts, head


# ----------------------------------------------------------------------------- S3 (moto's real server)

@pytest.fixture(scope="session")
def s3_endpoint():
    """http://127.0.0.1:PORT of moto's S3 server, started here (a real HTTP server, in a thread)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> str:
    """AWS_* pointing at the test server (fake keys); returns the endpoint."""
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the test server; returns its name."""
    import boto3

    name = f"adapters-{os.getpid()}-{next(_counter)}-{int(time.time() * 1000) % 100000}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
