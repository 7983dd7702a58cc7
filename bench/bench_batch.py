"""`adapters batch` of 8 merges on a ~0.5 GB base: Ray (local) vs 8 sequential `adapters merge` processes.

    python bench/bench_batch.py [--size-gb 0.5] [--jobs 8] [--max-parallel 2] [--keep]

Builds (under a temp dir) the synthetic Llama-like bf16 base of bench_merge_folder.py and
`--jobs` MoRA adapters (r=8 on every linear module, alternating types 1 and 6, each its own
seed), then, on fresh stores:
- sequential: one `adapters merge ADAPTER --base BASE --to safetensors -o OUT_i` process per job,
  one after the other (registration included, as batch does);
- ray: `adapters batch PLAN --executor ray --max-parallel N` (starts a local Ray, stops it after);
- cached: the same batch again: every job `cached` (keys recomputed, outputs' digests checked).
Prints wall seconds of each (whole processes), the ratio ray/sequential (on 2 cores the floor is
near 0.5x) and the per-job cost of the cached re-run. One run each: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "bench"))

from bench_merge_folder import build_adapter, build_base  # noqa: E402

ADAPTERS = [sys.executable, "-m", "adapters_cli"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... exited {p.returncode}:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--max-parallel", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import os

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        base = tmp / "base"
        n_layers, total, _ = build_base(base, args.size_gb)
        adapters = []
        for i in range(args.jobs):
            d = tmp / f"adapter-{i}"
            build_adapter(d, n_layers, mora_type=1 if i % 2 == 0 else 6)
            # a different M per job (build_adapter is deterministic per type)
            from safetensors.torch import load_file, save_file

            t = load_file(str(d / "adapter_model.safetensors"))
            save_file({k: v * (1 + i / 100) for k, v in t.items()}, str(d / "adapter_model.safetensors"))
            adapters.append(d)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERS_")}
        print(f"base {total / 1e9:.2f} GB ({n_layers} layers), {args.jobs} MoRA adapters, "
              f"max-parallel {args.max_parallel}", flush=True)

        seq_env = {**env, "ADAPTERS_HOME": str(tmp / "home-seq")}
        t_seq = 0.0
        for i, d in enumerate(adapters):
            dt, _ = timed([*ADAPTERS, "merge", str(d), "--base", str(base), "--to", "safetensors",
                           "-o", str(tmp / "seq" / f"out-{i}"), "--json"], seq_env)
            t_seq += dt
        shutil.rmtree(tmp / "seq")

        plan = tmp / "plan.json"
        plan.write_text(json.dumps({"defaults": {"base": str(base), "to": "safetensors"}, "jobs": [
            {"adapters": [str(d)], "output": str(tmp / "batch" / f"out-{i}")} for i, d in enumerate(adapters)]}))
        b_env = {**env, "ADAPTERS_HOME": str(tmp / "home-batch")}
        cmd = [*ADAPTERS, "batch", str(plan), "--executor", "ray", "--max-parallel", str(args.max_parallel),
               "--json"]
        t_ray, out = timed(cmd, b_env)
        assert {j["status"] for j in json.loads(out)["jobs"]} == {"done"}, out
        t_cached, out = timed(cmd, b_env)
        assert {j["status"] for j in json.loads(out)["jobs"]} == {"cached"}, out
        t_cached_local, out = timed([*ADAPTERS, "batch", str(plan), "--json"], b_env)

        print(f"{'sequential adapters merge x' + str(args.jobs):<34} {t_seq:8.1f} s")
        print(f"{'adapters batch --executor ray':<34} {t_ray:8.1f} s   ratio ray/sequential {t_ray / t_seq:.2f}x "
              f"(floor on 2 cores ~0.5x)")
        print(f"{'cached re-run (ray)':<34} {t_cached:8.1f} s   {t_cached / args.jobs:.2f} s per job "
              "(includes starting Ray)")
        print(f"{'cached re-run (local executor)':<34} {t_cached_local:8.1f} s   "
              f"{t_cached_local / args.jobs:.2f} s per job")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
