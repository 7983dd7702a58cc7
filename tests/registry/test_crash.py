"""Crash safety: a push SIGKILLed at several points leaves no incomplete version,
`verify` stays clean, `gc` removes the leftovers, and the next push works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.builders import write_adapter

POINTS = ["staged", "durable", "published", "before_commit"]


def _push_cmd(folder: Path, name: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from adapters_cli.main import main; sys.exit(main(sys.argv[1:]))",
            "push", str(folder), "--name", name]


def _files(home: Path, sub: str) -> list[Path]:
    return [p for p in (home / "blobs" / sub).rglob("*") if p.is_file()]


def _check_recovers(reg, home: Path, folder: Path) -> None:
    assert reg.list() == [] or [v.ref for v in reg.list()] == ["x:1"]
    rep = reg.verify()
    assert rep.ok, rep.problems
    reg.gc()
    assert _files(home, "tmp") == []
    referenced = {f["digest"][7:] for v in reg.list(limit=0) for f in reg.resolve(v.ref).files}
    assert {p.name for p in _files(home, "sha256")} == referenced
    assert reg.verify().ok
    assert reg.push(folder, "x").ref == "x:1"  # in-process: the test already paid torch's import
    assert reg.verify().ok


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_fault_points(point, tmp_path, store_env, reg, registry_home):
    folder = write_adapter(tmp_path / "a", seed=3)
    env = dict(store_env, ADAPTERS_CRASH_AT=point)
    p = subprocess.run(_push_cmd(folder, "x"), env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert reg.list() == []  # nothing half-made is visible
    assert reg.events() == []
    if point in ("staged", "durable"):
        assert _files(registry_home, "tmp")  # the leftovers gc must clean
    if point in ("published", "before_commit"):
        assert _files(registry_home, "sha256")  # blobs renamed in, but no version: unreferenced
    _check_recovers(reg, registry_home, folder)
    assert [v.ref for v in reg.list()] == ["x:1"]


def test_kill_mid_copy_of_large_file(tmp_path, store_env, reg, registry_home):
    folder = write_adapter(tmp_path / "big", seed=4, modules=8, dim=1024, r=512)  # ~32 MiB of weights
    p = subprocess.Popen(_push_cmd(folder, "x"), env=store_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmpdir = registry_home / "blobs" / "tmp"
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        parts = list(tmpdir.glob("*.part")) if tmpdir.is_dir() else []
        if any(f.stat().st_size > 1 << 20 for f in parts if f.exists()):
            break
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    if p.returncode != -signal.SIGKILL:
        pytest.skip("the push finished before it could be killed mid-copy")
    assert reg.list() == []
    dry = reg.gc(dry_run=True)
    assert dry.leftovers and dry.bytes_freed > 1 << 20
    _check_recovers(reg, registry_home, folder)
