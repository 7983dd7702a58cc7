"""Serving latency: merged ONNX vs base ONNX (merging must cost nothing), vs PyTorch unmerged.

    python bench/bench_onnx_latency.py [--hidden 512] [--layers 4] [--reps 30]

One run builds a Llama-like base (random weights), a MoRA (type 6) and a LoRA adapter
on q/v/down projections, exports the base alone and the merged model with the same
exporter settings, then times, interleaved in one loop so drift hits all alike:

- merged ONNX and base ONNX on the same provider and thread count;
- PyTorch eager with the adapters applied *unmerged* (`mora_core.forward`), which is
  what serving without a merge costs.

Prints medians (ms) per shape and the ratios merged/base (target <= 1.02; also the
median of per-repetition ratios, "paired", which drift between repetitions cannot
bias), the noise floor "base/base" (a second session on the very same base graph, timed
the same way) and merged ONNX / PyTorch unmerged. One intra-op thread by default: on a shared
machine, multi-threaded runs measure the neighbours more than the graphs.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(1, 16), (1, 128), (4, 64)]


def make_base(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=512, tie_word_embeddings=False, use_cache=False)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def _op_signature(path: Path) -> list[str]:
    """Operator types in graph order: equal lists mean the same computation, other weights."""
    import onnx

    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _session(path: Path, provider: str, threads: int):
    """A session whose worker threads do not spin after a run.

    ORT's intra-op threads busy-wait after each run by default; with two sessions and
    PyTorch timed in turn on a few cores, the previous session's spinning threads would
    be billed to the next one.
    """
    import onnxruntime as ort

    from exporters.providers import provider_chain, quiet_ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with quiet_ort():
        return ort.InferenceSession(str(path), sess_options=opts, providers=provider_chain(provider))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for ORT and torch (1: least sensitive to other load)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from exporters.onnx_export import export_merged_onnx
    from exporters.providers import really_used
    from mora_core.adapter import load_adapter
    from mora_core.forward import apply_unmerged
    from tests.models import write_lora_adapter, write_mora_adapter

    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-latency-"))
    try:
        n_params = make_base(tmp / "base", args.hidden, args.layers, args.vocab)
        h, kv = args.hidden, args.hidden // 2
        shapes = {}
        for i in range(args.layers):
            p = f"model.layers.{i}"
            shapes.update({f"{p}.self_attn.q_proj": (h, h), f"{p}.self_attn.v_proj": (h, kv),
                           f"{p}.mlp.down_proj": (2 * h, h)})
        mora = write_mora_adapter(tmp / "mora", shapes, mora_type=6, r=8, scale=0.01)
        lora = write_lora_adapter(tmp / "lora", tmp / "base", "llama", ["q_proj", "v_proj", "down_proj"], r=16)
        adapters = [load_adapter(mora), load_adapter(lora)]
        weights = [1.0, 0.5]
        merged = export_merged_onnx(tmp / "base", adapters, weights, tmp / "merged", provider=args.provider,
                                    kv_cache=False)  # full-sequence runs: the plain graph
        export_merged_onnx(tmp / "base", [], [], tmp / "base-onnx", provider=args.provider, kv_cache=False)
        provider = merged["validation"]["provider"]
        same_graph = _op_signature(tmp / "merged" / "model.onnx") == _op_signature(tmp / "base-onnx" / "model.onnx")
        threads = args.threads
        torch.set_num_threads(threads)
        s_merged = _session(tmp / "merged" / "model.onnx", provider, threads)
        s_base = _session(tmp / "base-onnx" / "model.onnx", provider, threads)
        s_control = _session(tmp / "base-onnx" / "model.onnx", provider, threads)  # noise floor
        used = {really_used(s_merged)[0], really_used(s_base)[0]}

        model = AutoModelForCausalLM.from_pretrained(str(tmp / "base"), attn_implementation="eager").eval()
        hooks = apply_unmerged(model, adapters, weights)

        print(f"model     Llama-like {n_params / 1e6:.1f}M params, float32; MoRA t6 + LoRA on q/v/down "
              f"({args.layers} layers); provider {'/'.join(sorted(used))}, {threads} threads, {args.reps} reps")
        print(f"graphs    merged and base ONNX have the same operators in the same order: "
              f"{'yes' if same_graph else 'NO'}")
        print(f"{'shape':>9}  {'base ONNX':>10}  {'merged ONNX':>11}  {'torch unmerged':>14}  "
              f"{'merged/base':>11}  {'paired':>7}  {'base/base':>9}  {'merged/torch':>12}")
        rng = np.random.default_rng(0)
        for b, s in SHAPES:
            ids = rng.integers(0, args.vocab, size=(b, s), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            t_ids, t_mask = torch.from_numpy(ids), torch.ones(b, s, dtype=torch.long)

            def run_torch(t_ids=t_ids, t_mask=t_mask):
                with torch.no_grad():
                    model(input_ids=t_ids, attention_mask=t_mask)

            runs = {"base": lambda feed=feed: s_base.run(None, feed),
                    "merged": lambda feed=feed: s_merged.run(None, feed),
                    "control": lambda feed=feed: s_control.run(None, feed),
                    "torch": run_torch}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for fn in runs.values():  # warm-up
                fn()
                fn()
            shuffle = random.Random(b * 1000 + s)
            for _ in range(args.reps):
                order = list(runs)
                shuffle.shuffle(order)  # no candidate always follows the same one
                for k in order:
                    t = time.perf_counter()
                    runs[k]()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            paired = statistics.median(m / b_ for m, b_ in zip(times["merged"], times["base"]))
            print(f"{b:>4}x{s:<4}  {med['base']:>8.2f}ms  {med['merged']:>9.2f}ms  {med['torch']:>12.2f}ms  "
                  f"{med['merged'] / med['base']:>11.3f}  {paired:>7.3f}  {med['control'] / med['base']:>9.3f}  "
                  f"{med['merged'] / med['torch']:>12.3f}")
        hooks.remove()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
