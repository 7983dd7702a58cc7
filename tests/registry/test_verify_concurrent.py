"""`verify` beside `rm` + `gc` and a push that lost a race with `gc` (issue 12, point 13 and the
gc race of point 10), with real processes on SQLite and PostgreSQL.

verify pauses (registry.faults barrier) right after it has read the blob and version rows;
meanwhile a real `adapters rm` and `adapters gc` delete a version and its blobs. verify then
finds those blobs gone: a gc that ran legitimately, not damage, so it must exit 0. A blob
removed behind the registry's back, by contrast, is still reported.
"""

from __future__ import annotations

import os
import subprocess
import time

from registry.faults import PAUSE_ENV, SIGNAL_ENV
from tests.cli_runner import ENTRY, process_env


def _adapters(args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY, *map(str, args)], capture_output=True, text=True, env=process_env(env),
                          timeout=300, **kw)


def _wait_for(path, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended before the barrier: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("the command never reached the barrier")
        time.sleep(0.02)


def _paused(args, env, tmp_path, point, meanwhile) -> subprocess.CompletedProcess:
    """Run `adapters ARGS`, stopped at fault/pause point `point` while `meanwhile()` runs."""
    signal_dir = tmp_path / "barrier"
    signal_dir.mkdir(exist_ok=True)
    for f in signal_dir.iterdir():
        f.unlink()
    penv = dict(env, **{PAUSE_ENV: f"{point}:120", SIGNAL_ENV: str(signal_dir)})
    proc = subprocess.Popen([*ENTRY, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=process_env(penv))
    try:
        _wait_for(signal_dir / f"{point}.reached", proc)
        meanwhile()
    finally:
        (signal_dir / f"{point}.go").touch()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _verify_during(env, tmp_path, meanwhile) -> subprocess.CompletedProcess:
    return _paused(["verify"], env, tmp_path, "verify_listed", meanwhile)


def test_verify_beside_rm_and_gc_reports_no_false_damage(reg, make_adapter, store_env, tmp_path):
    for i in range(3):
        reg.push(make_adapter(f"a{i}", seed=i), "t/a")

    def rm_and_gc():
        for args in (["rm", "t/a:2"], ["rm", "t/a:3"], ["gc"]):
            r = _adapters(args, store_env)
            assert r.returncode == 0, r.stderr

    r = _verify_during(store_env, tmp_path, rm_and_gc)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), (r.stdout, r.stderr)
    assert "missing" not in r.stdout


def test_verify_still_reports_a_blob_removed_behind_its_back(reg, make_adapter, store_env, tmp_path):
    reg.push(make_adapter("a", seed=1), "t/a")
    victim = reg.blobs.path(reg.resolve("t/a:1").files[0]["digest"])

    r = _verify_during(store_env, tmp_path, victim.unlink)
    assert r.returncode == 1 and "is missing (used by t/a:1)" in r.stdout, (r.stdout, r.stderr)




def test_push_that_loses_a_race_with_gc_retries(reg, make_adapter, store_env, tmp_path):
    """A push hashes content the store already holds (no copy), then gc removes that blob before
    the push records it: the push copies the file after all instead of failing with exit 2."""
    folder = make_adapter("a", seed=5)
    reg.push(folder, "t/old")
    reg.delete("t/old:1")  # its blobs are now unreferenced: the next gc removes them
    r = _paused(["push", folder, "--name", "t/new"], store_env, tmp_path, "durable",
                lambda: _adapters(["gc"], store_env).check_returncode())
    assert r.returncode == 0 and r.stdout.strip() == "t/new:1", (r.stdout, r.stderr)
    assert reg.verify().ok
    assert os.path.getsize(reg.pull("t/new:1", tmp_path / "p") / "adapter_model.safetensors") > 0
