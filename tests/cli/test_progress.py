"""Progress on a terminal: stage names with elapsed seconds on a real pty; nothing when piped."""

from __future__ import annotations

import os
import pty
import re
import subprocess

from tests.builders import llama_like, mora_shapes, write_mora_adapter, write_tensor_base
from tests.cli_runner import ENTRY, process_env, run_adapters

STAGE = re.compile(r"([a-z][a-z ,()'A-Z]+?) (\d+\.\d)s")


def run_on_pty(args: list[object], home) -> tuple[int, str, str]:
    """`adapters ARGS` with stderr on a pseudo-terminal (stdout piped): (code, stdout, stderr as seen)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([*ENTRY, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=slave, env=process_env(None, home))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = p.stdout.read().decode()
    p.stdout.close()
    return p.wait(timeout=300), out, b"".join(chunks).decode(errors="replace")


def stages(tty_text: str) -> dict[str, list[float]]:
    """{stage name: elapsed seconds shown} from the self-overwriting line's frames."""
    seen: dict[str, list[float]] = {}
    for frame in tty_text.split("\r"):
        m = STAGE.match(frame.strip())
        if m:
            seen.setdefault(m.group(1), []).append(float(m.group(2)))
    return seen


def test_merge_shows_stages_with_elapsed_time_on_a_tty_and_nothing_when_piped(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like(), shards=2)
    write_mora_adapter(tmp_path / "m", mora_shapes())
    args = ["merge", tmp_path / "m", "--base", tmp_path / "base", "--to", "safetensors"]
    code, out, tty = run_on_pty([*args, "-o", tmp_path / "out"], tmp_path / "home")
    assert code == 0, tty
    seen = stages(tty)
    for name in ("resolving the base and the adapters", "merging", "registering the artifact"):
        assert name in seen, (name, tty)
    assert any(re.search(r"merging \d+\.\ds  \d", f) for f in tty.split("\r")), tty  # bytes within the stage
    assert tty.endswith("\r" + " " * 100 + "\r")  # the line is cleared before the summary
    assert "format" in out and "\r" not in out  # the summary on stdout, no progress there
    # piped: the same merge says nothing on stderr
    p = run_adapters([*args, "-o", tmp_path / "out2"], home=tmp_path / "home")
    assert p.returncode == 0 and p.stderr == ""
