"""Push and pull of a ~1 GB adapter against a plain file copy, measured in the same run.

    python bench/bench_registry_push.py [--gb 1.0] [--runs 3] [--dir DIR]

Floors: `copy` = shutil.copyfile + fsync of the adapter file (the durability a blob write
also pays); `copy blob` = the same copy of the stored blob that a pull reads;
`hash` = one sha256 pass over the file; `validate` = mora_core's load_adapter alone
(what a push of new content overlaps with its copy). Push must reach >= 0.8x the copy's throughput
(validation, hashing and writing overlap); a re-push of the same file should cost about
one hash pass; pull (verified while copying) >= 0.8x the copy. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry.api import Registry  # noqa: E402
from registry.copying import hash_file  # noqa: E402


def make_adapter(folder: Path, gb: float) -> Path:
    """A LoRA folder whose safetensors file is about `gb` GiB (float32 A/B pairs)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    r, dim = 256, 8192
    per_module = 2 * r * dim * 4
    modules = max(1, int(gb * (1 << 30) / per_module))
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((r, dim)) * 0.01).astype(np.float32)
    b = (rng.standard_normal((dim, r)) * 0.01).astype(np.float32)
    tensors = {}
    for i in range(modules):
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{p}.lora_A.weight"] = a + np.float32(i)
        tensors[f"{p}.lora_B.weight"] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    return folder


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copy_floor(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-push-", dir=args.dir))
    try:
        src = make_adapter(root / "adapter", args.gb)
        weights = src / "adapter_model.safetensors"
        size = weights.stat().st_size
        warm = make_adapter(root / "warm", 0.001)  # pays torch's import outside the timings
        Registry.open(root / "warmhome").push(warm, "warm")
        hash_file(weights)  # page cache warm for every contender alike
        from registry.folders import inspect_adapter

        copy_t, hash_t, push_t, repush_t, pull_t, val_t, bcopy_t = [], [], [], [], [], [], []
        for i in range(args.runs):
            dst = root / f"copy{i}"
            copy_t.append(timed(lambda dst=dst: copy_floor(weights, dst)))
            dst.unlink()
            hash_t.append(timed(lambda: hash_file(weights)))
            val_t.append(timed(lambda: inspect_adapter(src)))
            reg = Registry.open(root / f"home{i}")
            push_t.append(timed(lambda reg=reg: reg.push(src, "bench/big")))
            repush_t.append(timed(lambda reg=reg: reg.push(src, "bench/big")))
            info = reg.resolve("bench/big:1")
            blob = reg.blobs.path(next(f["digest"] for f in info.files if f["path"] == weights.name))
            bdst = root / f"blobcopy{i}"
            bcopy_t.append(timed(lambda blob=blob, bdst=bdst: copy_floor(blob, bdst)))
            bdst.unlink()
            pull_t.append(timed(lambda reg=reg, i=i: reg.pull("bench/big:1", root / f"pulled{i}")))
            assert len(reg.list("bench/big")) == 1
            reg.close()
            shutil.rmtree(root / f"home{i}")
            shutil.rmtree(root / f"pulled{i}")
        med = {k: statistics.median(v) for k, v in
               {"copy": copy_t, "hash": hash_t, "push": push_t, "re-push": repush_t, "copy blob": bcopy_t,
                "pull": pull_t, "validate": val_t}.items()}
        mb = size / (1 << 20)
        print(f"adapter file: {size / (1 << 30):.2f} GiB, {args.runs} runs, medians, {os.cpu_count()} cpus")
        for k, t in med.items():
            print(f"  {k:<9} {t:7.3f} s  {mb / t:8.0f} MiB/s")
        print(f"push  throughput / copy = {med['copy'] / med['push']:.2f}x  (target >= 0.8)")
        print(f"pull  throughput / copy = {med['copy'] / med['pull']:.2f}x  (target >= 0.8); "
              f"vs a plain copy of the same stored blob: {med['copy blob'] / med['pull']:.2f}x")
        print(f"re-push time / hash     = {med['re-push'] / med['hash']:.2f}x  (target ~1: hashing only)")
        print(f"validate (mora_core load_adapter alone) / copy = {med['validate'] / med['copy']:.2f}x: "
              "a push of new content cannot be faster than this (it overlaps the copy)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
