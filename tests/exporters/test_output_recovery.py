"""What a killed merge leaves beside `-o`, and the next run (issue 12, point 11), plus a mistyped
adapter folder reported as a folder (point 10).

A real process enters `exporters.outputs.staged_output`, writes part of an output and is
SIGKILLed: its `.<name>.partial-<pid>` folder stays. The next merge to the same `-o` removes
it (its writer's flock is free) and succeeds; a partial folder whose writer is still alive
is never touched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.builders import llama_like, mora_shapes, write_mora_adapter, write_tensor_base
from tests.cli_runner import run_adapters

WRITER = r"""
import os, signal, sys, time
from pathlib import Path
from exporters.outputs import staged_output
with staged_output(Path(sys.argv[1])) as tmp:
    (tmp / "model-00001.safetensors").write_bytes(b"x" * (1 << 20))
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def _writer(out, how) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out), how], stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def test_next_merge_removes_a_killed_merges_partial_folder(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like())
    write_mora_adapter(tmp_path / "m", mora_shapes())
    out = tmp_path / "out"
    proc, partial = _writer(out, "kill")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (tmp_path / f".out.partial-{proc.pid}").is_dir() and partial.endswith(f".out.partial-{proc.pid}")
    p = run_adapters(["merge", tmp_path / "m", "--base", tmp_path / "base", "--to", "safetensors", "-o", out,
                      "--no-register"], home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["base", "m", "out"]


def test_a_live_writers_partial_folder_is_left_alone(tmp_path):
    from exporters.outputs import remove_abandoned_partials

    out = tmp_path / "out"
    live, live_partial = _writer(out, "sleep")
    dead, _ = _writer(out, "kill")
    dead.wait(timeout=60)
    try:
        removed = remove_abandoned_partials(out)
        assert [p.name for p in removed] == [f".out.partial-{dead.pid}"]
        assert (tmp_path / f".out.partial-{live.pid}").is_dir()
    finally:
        live.kill()
        live.wait()
    time.sleep(0.1)
    assert [p.name for p in remove_abandoned_partials(out)] == [f".out.partial-{live.pid}"]


def test_a_mistyped_adapter_folder_is_reported_as_a_folder(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like())
    for arg, needle in (("./lora-qvv", "no such adapter folder"), (str(tmp_path / "Lora_QVV"), "no such adapter folder"),
                        ("lora-qvv", "no such adapter folder")):
        p = run_adapters(["merge", arg, "--base", tmp_path / "base", "--to", "safetensors", "-o", tmp_path / "out"],
                         home=tmp_path / "home", cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr
        assert "adapter name" not in p.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- killed merges and the store

def _merge(tmp_path, env=None, **kw):
    from tests.cli_runner import process_env

    return subprocess.run([sys.executable, "-m", "adapters_cli", "merge", str(tmp_path / "m"), "--base",
                           str(tmp_path / "base"), "--to", "safetensors", "-o", str(tmp_path / "out"), "--json"],
                          capture_output=True, text=True, timeout=300,
                          env=process_env(dict(env or {}), home=tmp_path / "home"), **kw)


def _gc(tmp_path):
    import json

    p = run_adapters(["gc", "--json"], home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_a_merge_killed_before_registering_is_replaced_by_the_rerun(tmp_path):
    """Point 12: output renamed into place, process killed before the artifact is registered."""
    import json

    write_tensor_base(tmp_path / "base", llama_like())
    write_mora_adapter(tmp_path / "m", mora_shapes())
    p = _merge(tmp_path, {"ADAPTERS_CRASH_AT": "output_placed"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    g = _gc(tmp_path)
    assert g["unfinished_outputs"] == [str(tmp_path / "out")] and (tmp_path / "out").is_dir()
    p = _merge(tmp_path)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["reclaimed"] == [str(tmp_path / "out")] and s["artifact"]["ref"] == "artifact:1"
    v = run_adapters(["verify"], home=tmp_path / "home")
    assert v.returncode == 0 and "1 artifacts" in v.stdout, v.stdout
    assert _gc(tmp_path)["unfinished_outputs"] == []


def test_gc_removes_the_partial_folder_of_a_merge_killed_while_writing(tmp_path):
    """Point 11: the store knows where the killed merge was writing; gc frees it."""
    write_tensor_base(tmp_path / "base", llama_like())
    write_mora_adapter(tmp_path / "m", mora_shapes())
    p = _merge(tmp_path, {"ADAPTERS_CRASH_AT": "output_written"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    partial = tmp_path / f".out.partial-{_pid_of_partial(tmp_path)}"
    assert partial.is_dir() and not (tmp_path / "out").exists()
    size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    g = _gc(tmp_path)
    assert g["leftovers_removed"] == [str(partial)] and g["bytes_freed"] >= size > 0
    assert not partial.exists() and g["unfinished_outputs"] == []
    assert _merge(tmp_path).returncode == 0


def _pid_of_partial(tmp_path) -> int:
    (p,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    return int(p.name.rsplit("-", 1)[1])


def test_merged_files_keep_the_sources_restrictiveness(tmp_path):
    """Point 5: one 0600 source (here the base weights) makes the merged output private."""
    import os
    import stat

    write_tensor_base(tmp_path / "base", llama_like())
    write_mora_adapter(tmp_path / "m", mora_shapes())
    for f in (tmp_path / "base").iterdir():
        os.chmod(f, 0o600)
    p = run_adapters(["merge", tmp_path / "m", "--base", tmp_path / "base", "--to", "safetensors", "-o",
                      tmp_path / "out", "--no-register"], home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o600}
