"""Time `stream_merge` alone (no output files) on a kept bench base: the merge loop's own cost.

    python bench/time_stream_merge.py BASE_DIR ADAPTER_DIR [--reps 7]

`bench_merge_folder.py --keep` prints the kept dir (it holds the base `src` and the
adapters `mora6`...). The writer discards every tensor (`write`/`copy` do nothing), so the
time is: reading the merged tensors, the merge arithmetic, the casts and checks, and the
per-op dispatch that a footprint merge pays per region. Prints each repetition, the
median wall and CPU time, the 1-minute load, and a digest of every written tensor's bytes plus the summary's
max |dW| and tensors_changed (to compare two versions of mora_core byte for byte).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: PYTHONPATH wins

from mora_core.adapter import load_adapter  # noqa: E402
from mora_core.checkpoint import open_checkpoint  # noqa: E402
from mora_core.merge import plan_merge, stream_merge  # noqa: E402


class _Discard:
    """A TensorWriter that keeps nothing (optionally hashing what it is handed)."""

    def __init__(self, digest: bool):
        self.h = hashlib.sha256() if digest else None

    def start(self, shards) -> None:
        pass

    def write(self, planned, tensor) -> None:
        if self.h is not None:
            self.h.update(planned.name.encode())
            self.h.update(tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())

    def copy(self, planned, source, name) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    checkpoint = open_checkpoint(args.base)
    plan = plan_merge(checkpoint, [load_adapter(args.adapter)])
    check = _Discard(digest=True)
    stats = stream_merge(checkpoint, plan, check)
    times, cpu = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        stream_merge(checkpoint, plan, _Discard(digest=False))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print("reps:", " ".join(f"{t:.3f}" for t in times))
    print(f"stream_merge median {statistics.median(times):.3f} s wall, {statistics.median(cpu):.3f} s CPU "
          f"over {args.reps} (load {os.getloadavg()[0]:.2f}); "
          f"merged {stats.tensors_merged}, changed {stats.tensors_changed}, max|dW| {stats.max_abs_delta!r} "
          f"({stats.max_abs_delta_tensor}); digest {check.h.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
