"""Time and peak RSS of `adapters merge --to onnx` (one child process each), against Optimum.

    python bench/bench_onnx_export.py [--shapes bench-100m|tinyllama-1.1b|llama-3.2-3b]
        [--dtype float32|float16|int4] [--base-dtype bfloat16] [--optimum] [--no-validate-run]
        [--work DIR] [--json]

Random-weight Llama base of the named shapes (written once by `make_llama_base.py` into
`--work`, reused by later runs), a MoRA type-6 adapter (r=8) and a LoRA adapter (r=16) on
q_proj/v_proj of every layer, merged with weights 1 and 0.5. Runs, each as its own child
process (`python -m adapters_cli merge ... --no-register --json`; peak RSS is the child's
ru_maxrss from `os.wait4`):

1. `--to onnx` with validation (the default command);
2. `--to onnx --no-validate` (export alone) unless `--no-validate-run` is not wanted;
3. with `--optimum`: the peer, `optimum-cli export onnx --model MERGED --task text-generation-with-past`
   on the same merge written `--to safetensors` (Optimum validates by default; its own
   virtualenv under `--work`, created on first use with `python -m venv
   --system-site-packages` + `pip install optimum-onnx`, so the project's environment is
   never touched; it reuses this torch and onnxruntime-gpu).

Prints wall seconds, the exporter's own stage times, peak RSS and the memory target
`peak RSS <= 1.5 x graph weight bytes + 1 GB` (graph weight bytes: the initializers of
the written graph, external data included), and the ratios to Optimum. Each configuration
runs once: the big ones take minutes and most of the machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GB = 1e9


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd`: wall seconds, peak RSS (bytes, the child's ru_maxrss from wait4), exit code, output."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    import threading

    chunks: dict[str, bytes] = {}

    def drain(name: str, stream) -> None:
        chunks[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", p.stdout), ("err", p.stderr))]
    for th in threads:
        th.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    for th in threads:
        th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss": ru.ru_maxrss * 1024, "rc": p.returncode,
            "stdout": chunks.get("out", b"").decode(errors="replace"),
            "stderr": chunks.get("err", b"").decode(errors="replace")}


def graph_weight_bytes(folder: Path) -> int:
    """Bytes of the graph's initializers (inline raw data and external data alike)."""
    from exporters.onnx_weights import initializer_bytes

    return initializer_bytes(folder / "model.onnx")


def write_lora(folder: Path, layers: int, hidden: int, kv: int, r: int = 16, seed: int = 2) -> Path:
    """A PEFT LoRA folder on q_proj/v_proj of every layer (A, B random: a non-zero delta)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj, out_f in (("q_proj", hidden), ("v_proj", kv)):
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.02
            tensors[f"{p}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
         "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}))
    return folder


def prepare(work: Path, shapes: str, base_dtype: str) -> tuple[Path, list[Path]]:
    """The base folder and the two adapters (written once, reused)."""
    from make_llama_base import SHAPES, write_base

    from tests.builders import write_mora_adapter

    cfg = SHAPES[shapes]
    base = work / f"base-{shapes}-{base_dtype}"
    if not (base / "config.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        write_base(base, shapes, base_dtype)
    h = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    mora, lora = work / f"mora-{shapes}", work / f"lora-{shapes}"
    if not mora.is_dir():
        mod = {}
        for i in range(cfg["num_hidden_layers"]):
            mod[f"model.layers.{i}.self_attn.q_proj"] = (h, h)
            mod[f"model.layers.{i}.self_attn.v_proj"] = (h, kv)
        write_mora_adapter(mora, mod, mora_type=6, r=8, scale=0.01)
    if not lora.is_dir():
        write_lora(lora, cfg["num_hidden_layers"], h, kv)
    return base, [mora, lora]


def optimum_cli(work: Path) -> Path:
    """optimum-cli in its own virtualenv under `work` (created once)."""
    venv = work / "optimum-venv"
    exe = venv / "bin" / "optimum-cli"
    if not exe.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "optimum-onnx"], check=True)
    return exe


def merge_cmd(base: Path, adapters: list[Path], out: Path, to: str, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "adapters_cli", "merge", *map(str, adapters), "--weight", "1", "--weight", "0.5",
           "--base", str(base), "--to", to, "-o", str(out), "--no-register", "--json"]
    return cmd + extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="bench-100m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "int4"])
    ap.add_argument("--base-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--optimum", action="store_true", help="also time optimum-cli export onnx (the peer)")
    ap.add_argument("--skip-validated", action="store_true", help="only the --no-validate export")
    ap.add_argument("--skip-export-only", action="store_true", help="only the validated export")
    ap.add_argument("--extra", default="", help="extra merge options, space separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-onnx-export"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    base, adapters = prepare(args.work, args.shapes, args.base_dtype)
    env = dict(os.environ)
    extra = ["--dtype", args.dtype] + args.extra.split()
    results: dict[str, dict] = {}
    outs = []
    try:
        runs = []
        if not args.skip_export_only:
            runs.append(("export", extra + ["--no-validate"]))
        if not args.skip_validated:
            runs.append(("export+validation", extra))
        for label, opts in runs:
            out = args.work / f"out-{label}"
            shutil.rmtree(out, ignore_errors=True)
            outs.append(out)
            r = run_measured(merge_cmd(base, adapters, out, "onnx", opts), env)
            if r["rc"] == 0:
                s = json.loads(r["stdout"])
                r["seconds"] = s.get("seconds")
                r["graph_bytes"] = graph_weight_bytes(out)
                v = s.get("validation") or {}
                r["max_abs_diff"] = v.get("max_abs_diff")
                r["memory"] = s.get("memory")
            results[label] = r
            shutil.rmtree(out, ignore_errors=True)
        if args.optimum:
            merged = args.work / "merged"
            shutil.rmtree(merged, ignore_errors=True)
            r = run_measured(merge_cmd(base, adapters, merged, "safetensors", []), env)
            if r["rc"]:
                raise SystemExit(f"merge --to safetensors failed: {r['stderr'][-2000:]}")
            exe = optimum_cli(args.work)
            out = args.work / "out-optimum"
            shutil.rmtree(out, ignore_errors=True)
            outs += [merged, out]
            penv = {k: v for k, v in env.items() if k != "PYTHONPATH"}
            cmd = [str(exe), "export", "onnx", "--model", str(merged), "--task", "text-generation-with-past",
                   "--framework", "pt", str(out)]
            if args.dtype == "float16":
                cmd += ["--dtype", "fp16"]
            r = run_measured(cmd, penv)
            if r["rc"] == 0:
                r["graph_bytes"] = graph_weight_bytes(out)
            results["optimum"] = r
    finally:
        for o in outs:
            shutil.rmtree(o, ignore_errors=True)

    print(f"model {args.shapes}, base {args.base_dtype}, graph {args.dtype}; one child process per row")
    print(f"{'run':<20}{'rc':>4}{'wall s':>9}{'peak RSS GB':>13}{'graph GB':>10}{'target GB':>11}{'RSS/target':>12}")
    for label, r in results.items():
        g = r.get("graph_bytes")
        target = 1.5 * g + GB if g else None
        ratio = f"{r['peak_rss'] / target:12.2f}" if target else f"{'-':>12}"
        print(f"{label:<20}{r['rc']:>4}{r['wall_s']:>9.1f}{r['peak_rss'] / GB:>13.2f}"
              f"{(g or 0) / GB:>10.2f}{(target or 0) / GB:>11.2f}{ratio}")
        if r.get("seconds"):
            print(f"{'':<20}stages: {r['seconds']}")
        if r["rc"]:
            print(f"{'':<20}error: {(r['stderr'].strip().splitlines() or [''])[-1][:300]}")
    opt = results.get("optimum")
    if opt and opt["rc"] == 0:
        for label in ("export", "export+validation"):
            if label in results and results[label]["rc"] == 0:
                print(f"{label} / optimum-cli time: {results[label]['wall_s'] / opt['wall_s']:.2f}x "
                      f"(target {'1.0' if label == 'export' else '1.5'}x); peak RSS "
                      f"{results[label]['peak_rss'] / opt['peak_rss']:.2f}x")
    if args.json:
        slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("stdout",)} for k, v in results.items()}
        for v in slim.values():
            v["stderr"] = v["stderr"][-1500:]
        print(json.dumps(slim, indent=2, default=str))


if __name__ == "__main__":
    main()
