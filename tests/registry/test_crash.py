"""Crash safety: a push SIGKILLed at each fault point (`registry.faults`, exact, no timers)
leaves no visible or half-made version, only what `gc` removes; killed after the commit it
leaves a complete version; `verify` stays clean and the next push works."""

from __future__ import annotations

import ast
import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import registry
from registry.faults import CRASH_ENV, POINTS
from tests.builders import write_adapter
from tests.conftest import store_snapshot

PUSH = "import sys; from registry.api import Registry; Registry.open().push(sys.argv[1], sys.argv[2])"
BEFORE_PUBLISH = ("copying", "staged", "durable")


def _files(home: Path, sub: str) -> list[Path]:
    return [p for p in (home / "blobs" / sub).rglob("*") if p.is_file()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_recovers(reg, home: Path, folder: Path) -> None:
    rep = reg.verify()
    assert rep.ok, rep.problems
    reg.gc()
    assert _files(home, "tmp") == []
    referenced = {f["digest"][7:] for v in reg.list(limit=0) for f in reg.resolve(v.ref).files}
    assert {p.name for p in _files(home, "sha256")} == referenced
    assert reg.verify().ok
    assert reg.push(folder, "x").ref == "x:1"  # in-process: the test already paid torch's import
    assert reg.verify().ok


def test_fault_points_in_the_code_are_the_tested_ones():
    """Every `fault_point("...")` call in registry/ names a point of POINTS, and each is used."""
    root = Path(registry.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fault_point" and node.args:
                found.add(node.args[0].value)
    assert found == set(POINTS)


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_fault_point(point, tmp_path, store_env, reg, registry_home):
    # weights over one 16 MiB kernel-copy step, so "copying" stops inside the file
    folder = write_adapter(tmp_path / "a", seed=3, modules=5, dim=1024, r=512)
    weights = folder / "adapter_model.safetensors"
    sources = {p.name: p for p in folder.iterdir()}
    before = store_snapshot(registry_home, reg)
    p = subprocess.run([sys.executable, "-c", PUSH, str(folder), "x"], env=dict(store_env, **{CRASH_ENV: point}),
                       capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    tmp, blobs = _files(registry_home, "tmp"), _files(registry_home, "sha256")
    if point == "committed":  # the version is complete: rows, blobs, audit event
        assert [v.ref for v in reg.list()] == ["x:1"]
        assert {f["path"]: f["digest"][7:] for f in reg.resolve("x:1").files} == \
            {n: _sha(s) for n, s in sources.items()}
        assert [e["action"] for e in reg.events()] == ["push"]
        assert reg.verify().ok
    else:  # nothing half-made is visible: no row at all, the audit chain untouched
        _, counts, head = store_snapshot(registry_home, reg)
        assert (counts, head) == before[1:]
        assert reg.list() == [] and reg.events() == []
    if point == "copying":  # the config copied whole, the weights in part; nothing under a digest
        assert blobs == [] and len(tmp) == 2
        config, part = sorted(tmp, key=lambda f: f.stat().st_size)
        assert _sha(config) == _sha(sources["adapter_config.json"])
        assert 0 < part.stat().st_size < weights.stat().st_size
        assert part.read_bytes() == weights.read_bytes()[:part.stat().st_size]
    elif point in BEFORE_PUBLISH:  # complete temp files, nothing under a digest yet
        assert blobs == []
        assert sorted(_sha(f) for f in tmp) == sorted(_sha(s) for s in sources.values())
    else:  # blobs renamed in whole, under their true digests; no temp file left behind
        assert tmp == []
        assert {b.name for b in blobs} == {_sha(s) for s in sources.values()}
        assert all(_sha(b) == b.name for b in blobs)
    if point in BEFORE_PUBLISH:
        dry = reg.gc(dry_run=True)
        assert sorted(dry.leftovers) == sorted(map(str, tmp)) and dry.bytes_freed == sum(f.stat().st_size for f in tmp)
    _check_recovers(reg, registry_home, folder)
    assert [v.ref for v in reg.list()] == ["x:1"]
