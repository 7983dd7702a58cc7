"""Where the peak RSS of `adapters merge --to onnx` is: resident memory sampled per stage.

    python bench/trace_onnx_memory.py [--shapes bench-100m|tinyllama-1.1b|llama-3.2-3b]
        [--dtype float32|float16|int4] [--graph-writer auto|fused|torch] [--no-validate] [--interval 0.05] [--work DIR] [--json]

Same base and adapters as `bench_onnx_export.py` (written once into `--work`, reused), one
merge in this process (`exporters.pipeline.run_merge`, no registration) while a thread reads
`VmRSS` from /proc/self/status every `--interval` seconds. The exporter's own stage
callbacks (`on_stage`: building, exporting, validating step by step, writing) mark the
samples, so the table says which stage holds the peak and how much each stage adds.
tracemalloc cannot do this: it does not see torch's or ONNX Runtime's allocations.

Prints, per stage in order: RSS at its start, its peak, its peak minus its start, seconds;
then the process's high-water mark (`VmHWM`, which `ru_maxrss` reports to a parent) and the
target `1.5 x graph weight bytes + 1 GB`. One run: on the big shapes it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GB = 1e9


def status_bytes(field: str) -> int:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class RssTrace:
    """Samples VmRSS on a thread; `mark(name)` starts a new stage."""

    def __init__(self, interval: float):
        self.interval = interval
        self.stages: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.mark("start")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self, name: str) -> None:
        rss = status_bytes("VmRSS")
        with self._lock:
            if self.stages:
                last = self.stages[-1]
                last["peak"] = max(last["peak"], rss)
                last["seconds"] = time.perf_counter() - last["t0"]
            self.stages.append({"stage": name, "start": rss, "peak": rss, "t0": time.perf_counter()})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = status_bytes("VmRSS")
            with self._lock:
                self.stages[-1]["peak"] = max(self.stages[-1]["peak"], rss)

    def stop(self) -> None:
        self.mark("end")
        self._stop.set()
        self._thread.join()


def main() -> None:
    from bench_onnx_export import graph_weight_bytes, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="bench-100m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "int4"])
    ap.add_argument("--base-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-onnx-export"))
    ap.add_argument("--graph-writer", default="auto", choices=["auto", "fused", "torch"],
                    help="which writer makes a KV-cache graph (adapters merge --graph-writer)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    base, adapters = prepare(args.work, args.shapes, args.base_dtype)
    out = args.work / "out-trace"
    shutil.rmtree(out, ignore_errors=True)

    from exporters.pipeline import MergeOptions, run_merge

    trace = RssTrace(args.interval)
    opts = MergeOptions(adapters=[str(a) for a in adapters], base_dir=base, target="onnx", out_dir=out,
                        weights=[1.0, 0.5], dtype=args.dtype, validate=not args.no_validate, register=False,
                        provider="cpu", on_stage=trace.mark, graph_writer=args.graph_writer)
    error = None
    try:
        summary = run_merge(opts)
    except Exception as exc:  # the trace up to the failure is still the point
        summary, error = None, f"{type(exc).__name__}: {exc}"
    trace.stop()
    hwm = status_bytes("VmHWM")
    graph = graph_weight_bytes(out) if summary else None
    shutil.rmtree(out, ignore_errors=True)

    print(f"model {args.shapes}, graph {args.dtype}, validation {'off' if args.no_validate else 'on'}; "
          f"VmRSS every {args.interval:g} s")
    print(f"{'start GB':>9}{'peak GB':>9}{'+GB':>7}{'s':>8}  stage")
    for s in trace.stages[:-1]:
        print(f"{s['start'] / GB:>9.2f}{s['peak'] / GB:>9.2f}{(s['peak'] - s['start']) / GB:>7.2f}"
              f"{s.get('seconds', 0):>8.1f}  {s['stage'][:90]}")
    line = f"VmHWM {hwm / GB:.2f} GB"
    if graph:
        target = 1.5 * graph + GB
        line += f"; graph weights {graph / GB:.2f} GB; target {target / GB:.2f} GB; HWM/target {hwm / target:.2f}"
    print(line)
    if error:
        print("error:", error[:400])
    if args.json:
        print(json.dumps({"stages": [{k: v for k, v in s.items() if k != "t0"} for s in trace.stages],
                          "hwm": hwm, "graph_bytes": graph, "error": error}, indent=2))


if __name__ == "__main__":
    main()
