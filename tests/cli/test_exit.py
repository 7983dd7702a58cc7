"""`adapters_cli.main.exit_now`: the entry points end the process without the interpreter's
teardown, yet every atexit handler runs, buffered output is flushed, and a non-daemon thread
still running is waited for (the normal exit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=env)


def test_exit_now_runs_atexit_handlers_and_flushes_what_was_printed():
    p = _run("import atexit, sys\n"
             "atexit.register(lambda: print('cleanup ran'))\n"
             "sys.stdout.write('no newline yet')\n"  # a pipe: block-buffered, still in the buffer
             "sys.stderr.write('err ')\n"
             "from adapters_cli.main import exit_now\n"
             "exit_now(3)\n"
             "print('never')\n")
    assert p.returncode == 3
    assert p.stdout == "no newline yetcleanup ran\n"
    assert p.stderr == "err "


def test_exit_now_waits_for_a_running_non_daemon_thread(tmp_path):
    marker = tmp_path / "done"
    p = _run("import sys, threading, time\n"
             "from pathlib import Path\n"
             "t = threading.Thread(target=lambda: (time.sleep(0.5), Path(sys.argv[1]).write_text('x')))\n"
             "t.start()\n"
             "from adapters_cli.main import exit_now\n"
             "exit_now(0)\n", str(marker))
    assert p.returncode == 0, p.stderr
    assert marker.read_text() == "x"


def test_the_module_entry_point_exits_with_the_commands_code():
    ok = subprocess.run([sys.executable, "-m", "adapters_cli", "--version"], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("adapters, version")
    bad = subprocess.run([sys.executable, "-m", "adapters_cli", "merge", "--to", "nowhere"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
