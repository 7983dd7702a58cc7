"""Whole-folder MoRA merge (`adapters merge` CLI) against a Python process copying the folder.

    python bench/bench_merge_folder.py [--size-gb 1.0] [--reps 3] [--mora-types 1,6] [--keep]

Builds, under a temp dir in /tmp (removed at the end unless --keep), a synthetic
Llama-like bf16 base (hidden 2048, intermediate 5504, vocab 32000, untied lm_head,
`model.layers.N.self_attn.q_proj.weight`..., enough layers for >= --size-gb GiB, ~4 shards,
`model.safetensors.index.json`, config.json) and one MoRA adapter per type (r=8, all seven
linear modules of every layer, lora_A == lora_B = the r_hat x r_hat float32 matrix).

Then, alternating, --reps times each (outputs deleted between runs):
- floor: `python -c "import torch, shutil; shutil.copytree(src, dst)"` (a process that
  imports torch and reads and writes every byte; no fsync);
- durable copy (a reference, no target): the floor, then every copied file and the folder
  fsynced, as a registered output must be before it is recorded: how much of a merge's
  excess over the floor is the disk's time to hold the bytes;
- moraT: `python -m adapters_cli merge ADAPTER --base SRC --to safetensors -o DST --no-register
  --json` for each type (the merge fsyncs every shard it writes; the floor does not);
- moraT+reg: the same merge registered (the default) in a store that has never seen this
  base: the store is opened by a registry worker process (beside torch's import), the base
  is hashed once (in a thread, beside the import and the merge), the output is hashed
  while written; one fresh store per repetition, created before timing;
- moraT+reg again: registered in a store that merged this base before (an untimed primer
  run): the base's digests come from the store's file-digest cache.
Wall time is whole process against whole process (interpreter start and imports included;
this project's packages compiled to bytecode first, as a wheel install does).
Peak RSS is each child's own ru_maxrss (os.wait4), the larger of the merge's and its worker's;
CPU adds both (the worker is reaped here, see `reap_orphans`). The page cache cannot be dropped here,
so the base is read once beforehand (warm cache) and every run reads it from memory.

Targets: merge median <= 1.5x floor median, registered or not; a second registered merge
of the same base <= 1.2x; peak RSS <= 4 x largest tensor (stored dtype) + 400 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # appended: a patched mora_core first on PYTHONPATH wins

HIDDEN, INTER, VOCAB = 2048, 5504, 32000
LINEAR = {  # module -> (out, in) of the Linear weight
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
}
RSS_TARGET_FACTOR, RSS_TARGET_EXTRA_MB, TIME_TARGET, AGAIN_TARGET = 4, 400, 1.5, 1.2
MB = 1e6
DURABLE_COPY = """import os, shutil, sys, torch
shutil.copytree(sys.argv[1], sys.argv[2])
for path in [os.path.join(sys.argv[2], n) for n in os.listdir(sys.argv[2])] + [sys.argv[2]]:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def _layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}"
    t = {f"{p}.{m}.weight": s for m, s in LINEAR.items()}
    t[f"{p}.input_layernorm.weight"] = (HIDDEN,)
    t[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
    return t


def build_base(root: Path, size_gb: float, n_shards: int = 4) -> tuple[int, int, int]:
    """Write the base; returns (n_layers, total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    per_layer = sum(math.prod(s) for s in _layer_tensors(0).values()) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    n_layers = max(1, math.ceil((size_gb * (1 << 30) - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(n_layers):
        shapes.update(_layer_tensors(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    total = sum(math.prod(s) for s in shapes.values()) * 2
    per_shard = total / n_shards
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    # one random pool, sliced per tensor (randn of 0.6 G elements would dominate set-up)
    pool = (torch.randn(VOCAB * HIDDEN + 4096, generator=gen) * 0.02).to(torch.bfloat16)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names = list(shapes)
    for k, name in enumerate(names):
        n = math.prod(shapes[name])
        if name.endswith("norm.weight"):
            t = torch.ones(shapes[name], dtype=torch.bfloat16)
        else:
            off = (k * 977) % 4096
            t = pool[off: off + n].view(shapes[name]).clone()
        if size >= per_shard * len(shards) and len(shards) < n_shards:
            shards.append({})
        shards[-1][name] = t
        size += n * 2
    weight_map = {}
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": n_layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, indent=2))
    largest = max(math.prod(s) for s in shapes.values()) * 2
    return n_layers, total, largest


def build_adapter(root: Path, n_layers: int, mora_type: int, r: int = 8) -> None:
    import torch
    from safetensors.torch import save_file

    from mora_core.mora import mora_rank

    gen = torch.Generator().manual_seed(mora_type)
    tensors = {}
    for i in range(n_layers):
        for m, (out_f, in_f) in LINEAR.items():
            rh = mora_rank(in_f, out_f, r, mora_type)
            mat = torch.randn(rh, rh, generator=gen) * 1e-3
            key = f"base_model.model.model.layers.{i}.{m}"
            tensors[f"{key}.lora_A.weight"] = mat
            tensors[f"{key}.lora_B.weight"] = mat.clone()
    root.mkdir(parents=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "use_mora": True, "mora_type": mora_type, "r": r, "lora_alpha": 16,
        "target_modules": [m.split(".")[-1] for m in LINEAR], "lora_dropout": 0.0, "bias": "none"}))


def reap_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux prctl
    PR_SET_CHILD_SUBREAPER): a process a merge leaves to finish on its own (the registry
    worker, which exits after the merge closes its input) is then waited for here, and its
    CPU counted with the merge's. False where the call is not available."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS MB, stdout, CPU seconds user+sys) for one subprocess and every
    process it started: the wall time runs until the last of them closed the output pipes
    (the registry worker shares stderr), CPU adds them all, the peak is the largest one's."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = p.stdout.read(), p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{cmd[:3]}... exited {p.returncode}:\n{err.decode()[-2000:]}")
    cpu, peak = ru.ru_utime + ru.ru_stime, ru.ru_maxrss
    while True:  # orphans handed to this process (see reap_orphans)
        try:
            _, _, ru = os.wait4(-1, 0)
        except ChildProcessError:
            break
        cpu, peak = cpu + ru.ru_utime + ru.ru_stime, max(peak, ru.ru_maxrss)
    return wall, peak / 1024 * (1 << 20) / MB, out.decode(), cpu


PACKAGES = ("adapters_cli", "registry", "exporters", "mora_core")


def compile_bytecode(pythonpath: str) -> list[str]:
    """Compile this project's packages (wherever the children import them from) to bytecode,
    as a wheel install does (scripts/setup.sh does it for the editable install): with
    PYTHONDONTWRITEBYTECODE set, every child would otherwise compile ~100 modules again."""
    import compileall

    done = []
    for entry in dict.fromkeys(pythonpath.split(os.pathsep)):
        for pkg in PACKAGES:
            if entry and (Path(entry) / pkg / "__init__.py").is_file():
                compileall.compile_dir(str(Path(entry) / pkg), quiet=1)
                done.append(str(Path(entry) / pkg))
    return done


def warm(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="base size in GiB (bf16), default 1.0")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mora-types", default="1,6")
    ap.add_argument("--dir", default=None, help="parent of the temp dir (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    types = [int(t) for t in args.mora_types.split(",")]
    if args._build:  # set-up, run in a child so that this process never grows (see below)
        tmp = Path(args._build)
        n_layers, total, largest = build_base(tmp / "base", args.size_gb)
        for t in types:
            build_adapter(tmp / f"mora{t}", n_layers, t)
        print(json.dumps([n_layers, total, largest]))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench_merge_folder_", dir=args.dir or "/tmp"))
    reaper = reap_orphans()
    pp = os.pathsep.join(x for x in (os.environ.get("PYTHONPATH"), str(REPO)) if x)  # a patched mora_core may go first
    env = dict(os.environ, ADAPTERS_HOME=str(tmp / "home"), PYTHONPATH=pp)
    try:
        t0 = time.perf_counter()
        base = tmp / "base"
        # Linux records the pre-exec memory of a forked child into its ru_maxrss, so
        # this parent must stay small (no torch here) for the children's peaks to be theirs.
        built = subprocess.run([sys.executable, __file__, "--_build", str(tmp), "--size-gb", str(args.size_gb),
                                "--mora-types", args.mora_types], env=env, check=True,
                               capture_output=True, text=True)
        n_layers, total, largest = json.loads(built.stdout.strip().splitlines()[-1])
        n_files = len(list(base.glob("*.safetensors")))
        print(f"base: {n_layers} layers, {n_files} shards, {total / MB:.0f} MB bf16 "
              f"({total / (1 << 30):.2f} GiB), largest tensor {largest / MB:.1f} MB; "
              f"MoRA r=8 types {types} on all 7 linear modules per layer; set-up {time.perf_counter() - t0:.1f} s")
        floor_cmd = [sys.executable, "-c", "import sys, shutil, torch; shutil.copytree(sys.argv[1], sys.argv[2])"]
        durable_cmd = [sys.executable, "-c", DURABLE_COPY]
        merge_cmd = [sys.executable, "-m", "adapters_cli", "merge"]  # the console script minus pyenv's shim
        print("floor: python -c 'import torch, shutil; shutil.copytree(SRC, DST)'\n"
              "durable copy: the floor, then each file and the folder fsynced (a reference, no target)\n"
              "merge: python -m adapters_cli merge ADAPTER --base SRC --to safetensors -o DST --json "
              "[--no-register] --home H")
        reg_type = types[0]
        # stores created before timing (schema set-up is not the merge's cost): one fresh store per
        # first-merge repetition, and one store that has merged this base before (its file digests cached)
        homes = [tmp / f"home-first-{i}" for i in range(args.reps)] + [tmp / "home-again"]
        for h in homes:
            subprocess.run([sys.executable, "-c", "import sys; from registry.api import Registry; "
                            "Registry.open(sys.argv[1]).close()", str(h)], env=env, check=True)
        compiled = compile_bytecode(pp)
        print(f"bytecode: compiled {len(compiled)} packages ({', '.join(sorted({Path(c).parent.name for c in compiled}))}), "
              "as a wheel install does")
        warm(base)
        run_child(merge_cmd + [str(tmp / f"mora{reg_type}"), "--base", str(base), "--to", "safetensors",
                               "-o", str(tmp / "primer"), "--json", "--home", str(homes[-1])], env)
        shutil.rmtree(tmp / "primer")
        warm(base)
        print("page cache: cannot be dropped; base read once before timing (warm cache for every run)")
        print("CPU: each merge's own plus its registry worker's (reaped here)" if reaper else
              "CPU: each merge's own (this system cannot hand orphans to this process: the registry "
              "worker's CPU is not counted)")
        print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
              "(a forked child's ru_maxrss starts at its parent's)")

        keys = ["floor", "durable copy", *(f"mora{t}" for t in types), f"mora{reg_type}+reg",
                f"mora{reg_type}+reg again"]
        times: dict[str, list[float]] = {k: [] for k in keys}
        rss: dict[str, list[float]] = {k: [] for k in keys}
        cpu: dict[str, list[float]] = {k: [] for k in keys}
        dst = tmp / "out"
        for rep in range(args.reps):
            for key in keys:
                if key in ("floor", "durable copy"):
                    cmd = (floor_cmd if key == "floor" else durable_cmd) + [str(base), str(dst)]
                else:
                    adapter = tmp / key.split("+")[0]
                    cmd = merge_cmd + [str(adapter), "--base", str(base), "--to", "safetensors", "-o", str(dst),
                                       "--json"]
                    if "+reg" not in key:
                        cmd += ["--no-register", "--home", str(homes[-1])]
                    else:
                        cmd += ["--home", str(homes[rep] if key.endswith("+reg") else homes[-1])]
                wall, peak, out, cpu_s = run_child(cmd, env)
                if key.startswith("mora") and rep == 0:
                    with contextlib.suppress(json.JSONDecodeError):
                        rep_json = json.loads(out)
                        print(f"  {key}: tensors merged = {rep_json.get('tensors_merged')}, "
                              f"artifact = {(rep_json.get('artifact') or {}).get('ref')}")
                times[key].append(wall)
                rss[key].append(peak)
                cpu[key].append(cpu_s)
                shutil.rmtree(dst)
                print(f"  rep {rep + 1} {key:>15}: {wall:6.2f} s (CPU {cpu_s:5.2f} s), peak RSS {peak:7.1f} MB",
                      flush=True)

        floor_med = statistics.median(times["floor"])
        budget = RSS_TARGET_FACTOR * largest / MB + RSS_TARGET_EXTRA_MB
        print()
        print(f"largest tensor {largest / MB:.1f} MB (bf16); RSS budget 4 x {largest / MB:.1f} + 400 = {budget:.0f} MB")
        durable_med = statistics.median(times["durable copy"])
        hdr = (f"{'run':>15} {'median s':>9} {'min s':>7} {'ratio':>6} {'target':>6} {'time':>5} "
               f"{'peak RSS MB':>12} {'RSS':>5} {'CPU s':>6} {'CPU ratio':>9} {'vs durable':>10}")
        cpu_floor = statistics.median(cpu["floor"])
        print(hdr)
        print("-" * len(hdr))
        print(f"{'floor':>15} {floor_med:>9.2f} {min(times['floor']):>7.2f} {1.0:>6.2f} {'':>6} {'':>5} "
              f"{max(rss['floor']):>12.1f} {'':>5} {cpu_floor:>6.2f} {1.0:>9.2f}")
        ok = True
        print(f"{'durable copy':>15} {durable_med:>9.2f} {min(times['durable copy']):>7.2f} "
              f"{durable_med / floor_med:>6.2f} {'':>6} {'':>5} {max(rss['durable copy']):>12.1f} {'':>5} "
              f"{statistics.median(cpu['durable copy']):>6.2f} "
              f"{statistics.median(cpu['durable copy']) / cpu_floor:>9.2f} {1.0:>10.2f}")
        for k in keys[2:]:
            target = AGAIN_TARGET if k.endswith("again") else TIME_TARGET
            med = statistics.median(times[k])
            ratio = med / floor_med
            peak = max(rss[k])
            tpass, rpass = ratio <= target, peak <= budget
            ok &= tpass and rpass
            print(f"{k:>15} {med:>9.2f} {min(times[k]):>7.2f} {ratio:>6.2f} {target:>6.1f} "
                  f"{'PASS' if tpass else 'FAIL':>5} {peak:>12.1f} {'PASS' if rpass else 'FAIL':>5} "
                  f"{statistics.median(cpu[k]):>6.2f} {statistics.median(cpu[k]) / cpu_floor:>9.2f} "
                  f"{med / durable_med:>10.2f}")
        print(f"targets: merge <= {TIME_TARGET}x floor (registered or not), a second registered merge of the "
              f"same base <= {AGAIN_TARGET}x (medians, whole process), peak RSS <= {budget:.0f} MB: "
              f"{'PASS' if ok else 'FAIL'}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
