"""Progress on a terminal: stage names with elapsed seconds on a real pty; nothing when piped."""

from __future__ import annotations

import os
import pty
import re
import subprocess

from tests.builders import (
    linear_shapes,
    llama_like,
    mora_shapes,
    write_model_base,
    write_mora_adapter,
    write_tensor_base,
)
from tests.cli_runner import ENTRY, process_env, run_adapters

STAGE = re.compile(r"(.+?) (\d+\.\d)s(  .*)?$")


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


def test_onnx_export_and_validation_show_their_stages_ticking(tmp_path):
    """The ONNX export itself (one long call that reports nothing) ticks its elapsed seconds;
    validation names each comparison, the PyTorch references first (then the model is freed)."""
    base = write_model_base(tmp_path / "bert", "bert")
    adapter = write_mora_adapter(tmp_path / "m", linear_shapes("bert"), mora_type=6, seed=1, scale=0.05)
    code, out, tty = run_on_pty(["merge", adapter, "--base", base, "--to", "onnx", "-o", tmp_path / "out",
                                 "--no-register"], tmp_path / "home")
    assert code == 0, tty
    seen = stages(tty)
    expected = ["resolving the base and the adapters", "building the merged model (bert, float32)",
                "exporting the ONNX graph (torch.onnx, dynamo)", "writing the weights into model.onnx",
                "validating: vs the merged PyTorch model", "validating: vs the base with the adapters unmerged",
                "validating: running the graph on cpu (5 shapes)",
                "writing side files, export.json and the model card"]
    assert [name for name in seen if name in expected] == expected, list(seen)  # in this order
    export = seen["exporting the ONNX graph (torch.onnx, dynamo)"]
    assert len(export) >= 2 and max(export) >= 0.5, export  # redrawn while torch.onnx.export runs
    assert "validated" in out and "\r" not in out


def test_pack_shows_its_stages_on_a_tty(tmp_path):
    """`adapters pack` (builds the base, writes the file, validates it) names its stages too."""
    base = write_model_base(tmp_path / "base", "llama")
    adapter = write_mora_adapter(tmp_path / "m", linear_shapes("llama"), mora_type=1, seed=3, scale=0.05)
    p = run_adapters(["export", "--base", base, "--to", "onnx", "--slots", adapter, "--no-kv-cache",
                      "-o", tmp_path / "graph", "--no-register"], home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    code, out, tty = run_on_pty(["pack", adapter, "--graph", tmp_path / "graph", "-o", tmp_path / "m.onnx_adapter",
                                 "--no-register"], tmp_path / "home")
    assert code == 0, tty
    seen = stages(tty)
    expected = ["resolving the graph, the base and the adapter", "building the base model",
                "writing the adapter file"]
    assert [name for name in seen if name in expected] == expected, list(seen)  # in this order
    assert any(name.startswith("validating vs base + ") for name in seen), list(seen)
    assert "validated" in out and "\r" not in out
