"""Per-layer fused merge against the floor `W += dW` (dW precomputed), float32 W.

    python bench/bench_merge_layer.py [--reps 7] [--shapes 4096x4096,4096x11008,11008x4096]
                                      [--ranks 8,256] [--types 1,6] [--lora-r 16] [--threads N]

Convention: a shape `OUTxIN` is the `[out, in]` weight of a torch Linear
(in_features=IN, out_features=OUT); the default set holds both 4096x11008 and
11008x4096, so both the up- and the down-projection orientation are covered.

For each (shape, kind, r):
- fused: `MoraOperator(in, out, r_hat, type).add_into(W, M, 1.0)` (MoRA) or
  `LoraOp(...).add_into(W, 1.0, W)` (LoRA, `W.addmm_(B, A)`), in place;
- floor: `W.add_(dW)` with the dense `dW` built beforehand (outside the timing),
  i.e. the cheapest possible merge once the delta exists (read W, read dW, write W).
Both run on a fresh float32 copy of the same base W each repetition (the copy is made
outside the timed region), alternating fused/floor, one warm-up each, then `--reps`
timed repetitions; medians are reported. Target: median ratio fused/floor <= 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# appended, not prepended: a patched mora_core put first on PYTHONPATH takes precedence
sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mora_core.mora import MoraOperator, mora_rank  # noqa: E402
from mora_core.ops import LoraOp  # noqa: E402

TARGET = 1.0


def _case_fns(out_f: int, in_f: int, kind: str, r: int, gen: torch.Generator):
    """(r_hat or r, fused(W), dW) for one case."""
    if kind == "lora":
        a = torch.randn(r, in_f, generator=gen) * 0.01
        b = torch.randn(out_f, r, generator=gen) * 0.01
        op = LoraOp("w", (out_f, in_f), "bench", a=a, b=b, scaling=2.0)
        dw = op.delta(torch.zeros(out_f, in_f))
        return r, (lambda w: op.add_into(w, 1.0, w)), dw
    mora_type = int(kind.removeprefix("mora"))
    r_hat = mora_rank(in_f, out_f, r, mora_type)
    m = torch.randn(r_hat, r_hat, generator=gen) * 0.01
    op = MoraOperator(in_f, out_f, r_hat, mora_type)
    dw = op.delta(m)
    # index maps are cached per operator; build them outside the timing, as a merge
    # loop reuses nothing else either (a fresh operator per layer would pay ~ms here).
    _ = op.compress_map, op.decompress_map
    return r_hat, (lambda w: op.add_into(w, m, 1.0)), dw


def _timed(fn, w: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(w)
    return time.perf_counter() - t0


def run_case(out_f: int, in_f: int, kind: str, r: int, reps: int, check: bool) -> dict:
    gen = torch.Generator().manual_seed(out_f * 7 + in_f * 13 + r)
    base = torch.randn(out_f, in_f, generator=gen)
    rk, fused, dw = _case_fns(out_f, in_f, kind, r, gen)

    def floor(w: torch.Tensor) -> None:
        w.add_(dw)

    if check:  # the fused merge must equal the floor's result
        w1, w2 = base.clone(), base.clone()
        fused(w1)
        floor(w2)
        torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-5)
        del w1, w2
    t_fused, t_floor = [], []
    for i in range(reps + 1):  # first round is the warm-up
        w = base.clone()
        tf = _timed(fused, w)
        w.copy_(base)
        tl = _timed(floor, w)
        del w
        if i:
            t_fused.append(tf)
            t_floor.append(tl)
    fm, lm = statistics.median(t_fused), statistics.median(t_floor)
    return {"shape": f"{out_f}x{in_f}", "kind": kind, "r": r, "rk": rk,
            "fused_ms": fm * 1e3, "floor_ms": lm * 1e3, "ratio": fm / lm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="OUTxIN list")
    ap.add_argument("--ranks", default="8,256", help="MoRA r values")
    ap.add_argument("--types", default="1,6", help="MoRA types")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank (0: skip LoRA)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-check", action="store_true", help="skip the fused == floor correctness check")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    cases = []
    for out_f, in_f in shapes:
        for t in (int(x) for x in args.types.split(",")):
            for r in (int(x) for x in args.ranks.split(",")):
                cases.append((out_f, in_f, f"mora{t}", r))
        if args.lora_r:
            cases.append((out_f, in_f, "lora", args.lora_r))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 W, "
          f"{args.reps} reps after 1 warm-up, shape = [out, in] of a Linear weight")
    hdr = f"{'shape[out,in]':>14} {'kind':>6} {'r':>4} {'r_hat':>6} {'fused ms':>9} {'floor ms':>9} {'ratio':>6}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for out_f, in_f, kind, r in cases:
        row = run_case(out_f, in_f, kind, r, args.reps, not args.no_check)
        rows.append(row)
        rk = row["rk"] if kind != "lora" else "-"
        print(f"{row['shape']:>14} {kind:>6} {r:>4} {rk:>6} {row['fused_ms']:>9.2f} "
              f"{row['floor_ms']:>9.2f} {row['ratio']:>6.2f}", flush=True)
    ratios = [row["ratio"] for row in rows]
    med, mx = statistics.median(ratios), max(ratios)
    worst = max(rows, key=lambda x: x["ratio"])
    print(f"ratio fused/floor: median {med:.2f}, max {mx:.2f} ({worst['shape']} {worst['kind']} r={worst['r']}); "
          f"target median <= {TARGET:.1f}: {'PASS' if med <= TARGET else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
