"""Concurrent pushes from several processes (SQLite and PostgreSQL): distinct, gap-free
version numbers, no "database is locked", nothing lost, audit chain intact.

Each push pauses inside its write transaction (`ADAPTERS_PAUSE_AT`, registry.faults), so the
writers overlap for certain: only the writer lock (SQLite `BEGIN IMMEDIATE`, PostgreSQL's
state-row lock) keeps them apart, and the test fails without it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from registry.faults import PAUSE_ENV
from tests.builders import write_adapter

DRIVER = r"""
import json, sys, time
import mora_core.adapter  # pay torch's import before the start line
from registry.api import Registry
start, name, folders = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
reg = Registry.open()
while time.time() < start:
    time.sleep(0.001)
out = []
for f in folders:
    out.append([f, reg.push(f, name).ref])
print(json.dumps(out))
"""

PROCS = 4
PER_PROC = 3
PAUSE_S = 0.2


def test_concurrent_pushes_same_name(tmp_path, store_env, reg):
    folders = [[str(write_adapter(tmp_path / f"p{p}-{i}", seed=100 * p + i)) for i in range(PER_PROC)]
               for p in range(PROCS)]
    dup = str(write_adapter(tmp_path / "dup", seed=0))  # same bytes as p0-0: must not get its own version
    folders[-1].append(dup)
    start = time.time() + 6
    env = dict(store_env, **{PAUSE_ENV: f"before_commit:{PAUSE_S}"})
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(start), "team/shared", *fs], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for fs in folders]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "locked" not in err
        results.extend(json.loads(out))
    refs = {f: ref for f, ref in results}
    distinct = PROCS * PER_PROC
    numbers = sorted(int(ref.split(":")[1]) for f, ref in results if f != dup)
    assert numbers == list(range(1, distinct + 1))  # every push its own number, no gaps
    assert refs[dup] == refs[folders[0][0]]
    listed = reg.list("team/shared", limit=0)
    assert [v.number for v in listed] == list(range(distinct, 0, -1))
    for f, ref in results:  # nothing lost: each version holds the bytes that were pushed under it
        info = reg.resolve(ref)
        weights = next(x for x in info.files if x["path"] == "adapter_model.safetensors")
        assert reg.blobs.path(weights["digest"]).read_bytes() == open(f + "/adapter_model.safetensors", "rb").read()
    rep = reg.verify()
    assert rep.ok, rep.problems
    assert [e["action"] for e in reg.events()].count("push") == distinct + 1
