"""registry.worker: a store opened in a child process answers a merge's verbs as the store in
this process does (same rows, same errors), and never outlives the process that started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from registry.api import Registry
from registry.errors import RegistryError, StoreMissing
from registry.worker import RegistryWorker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker(registry_home: Path, db_url: str | None):
    w = RegistryWorker(registry_home, db_url)
    yield w
    w.close()
    assert w.wait(timeout=30) == 0


def _pending(home: Path, db_url: str | None) -> list[dict]:
    from registry import outputs

    with Registry.open(home, db_url) as reg:
        return outputs.pending(reg.db)


def test_digests_outputs_and_artifact_through_the_worker_are_the_stores_rows(tmp_path, registry_home, db_url,
                                                                           worker):
    files = []
    for i in range(2):
        files.append(tmp_path / f"w{i}.bin")
        files[-1].write_bytes(os.urandom(1000 + i))
    time.sleep(0.1)  # older than one timestamp tick: cacheable (git's racy rule)
    if db_url is None:  # a home without a store yet: nothing cached, nothing created
        nothing = worker.lookup_file_digests(files)
        nothing.hash()
        assert set(worker.finish_file_digests(nothing)) == {"w0.bin", "w1.bin"}
        assert not (registry_home / "registry.db").exists()
    worker.open(create=True)
    first = worker.lookup_file_digests(files)
    assert first.known == {} and len(first.todo) == 2
    first.hash()
    digests = worker.finish_file_digests(first)
    with Registry.open(registry_home, db_url) as reg:  # the worker wrote the cache rows of this store
        again = reg.lookup_file_digests(files)
        assert again.known == digests and again.todo == []
    assert worker.lookup_file_digests(files).known == digests

    out = tmp_path / "merged"
    token = worker.begin_output(out, "safetensors")
    (pending,) = _pending(registry_home, db_url)
    assert pending["path"] == str(out) and pending["pid"] == os.getpid()  # the writer, not the worker
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    worker.output_placed(token, out)
    recipe = {"kind": "safetensors", "base": {"files": digests}, "weight": 0.1 + 0.2}
    info = worker.register_artifact(kind="safetensors", path=out, files=None, recipe=recipe, inputs=[],
                                    output=token)
    assert _pending(registry_home, db_url) == []
    with Registry.open(registry_home, db_url) as reg:
        assert reg.artifact(info.ref) == info  # every field, datetime and float included
        assert reg.check_artifact(info.ref) == []


def test_errors_arrive_as_the_stores_own(tmp_path, worker):
    with pytest.raises(StoreMissing):
        RegistryWorker(tmp_path / "nowhere").open()
    assert not (tmp_path / "nowhere").exists()  # reading creates nothing
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        worker.begin_output(tmp_path / "out", "onnx", pid=sleeper.pid)
        with pytest.raises(RegistryError, match=f"another merge \\(process {sleeper.pid}\\)"):
            worker.begin_output(tmp_path / "out", "onnx")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_worker_is_one_registry_error(registry_home):
    w = RegistryWorker(registry_home)
    w.open(create=True)
    w._proc.kill()
    with pytest.raises(RegistryError, match="registry worker process ended unexpectedly .* during end_output"):
        w.end_output(1)
    w.close()


def test_the_worker_ignores_ctrl_c_and_exits_with_its_input(registry_home):
    w = RegistryWorker(registry_home)
    w.open(create=True)
    os.kill(w._proc.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the whole process group
    time.sleep(0.2)
    assert w.reclaim_output(registry_home / "x") == []  # still answering
    w.close()
    assert w.wait(timeout=30) == 0


def test_a_killed_merge_leaves_no_worker_running(registry_home, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from registry.worker import RegistryWorker
        w = RegistryWorker({str(registry_home)!r})
        w.open(create=True)
        print(w._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr
    pid = int(run.stdout.split()[0])
    deadline = time.time() + 30
    while time.time() < deadline and _running(pid):
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_worker_closes_the_store_before_its_quick_exit(tmp_path):
    """At the end of its input the worker skips the interpreter's teardown (`os._exit`), but only
    after closing the store: SQLite's last connection checkpoints the write-ahead log into the
    database and removes it, and a row written through the worker is there for the next reader."""
    from registry.api import Registry
    from registry.config import SQLITE_NAME

    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "registry.worker", json.dumps({"home": str(home)})],
                          input=b'{"verb": "open", "args": {"create": true}}\n'
                                b'{"verb": "begin_output", "args": {"path": "/tmp/never-written", "kind": "safetensors", "pid": 1}}\n',
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    token = json.loads(proc.stdout.splitlines()[1])["ok"]
    assert (home / SQLITE_NAME).is_file() and not (home / (SQLITE_NAME + "-wal")).exists()
    reg = Registry.open(home)
    try:
        reg.end_output(token)  # the pending row is there: ending it is what a failed merge does
    finally:
        reg.close()


def test_the_protocol_answers_one_line_per_request(registry_home):
    """Nothing the worker's libraries print reaches the answers (stdout is the protocol)."""
    proc = subprocess.run([sys.executable, "-m", "registry.worker", json.dumps({"home": str(registry_home)})],
                          input=b'{"verb": "open", "args": {"create": true}}\n{"verb": "nope", "args": {}}\n',
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert answers == [{"ok": None}, {"error": ["KeyError", "'nope'"]}] and proc.returncode == 0


def test_a_registry_folder_in_the_working_folder_is_not_imported(tmp_path, registry_home, monkeypatch):
    decoy = tmp_path / "cwd" / "registry"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('the decoy registry package was imported')\n")
    monkeypatch.chdir(decoy.parent)
    w = RegistryWorker(registry_home)
    assert w.open(create=True) is w
    w.close()
    assert w.wait(timeout=30) == 0
