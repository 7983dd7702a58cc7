"""Serving adapters unmerged from slot graphs (ONNX Runtime adapter files) vs merged graphs.

    python bench/bench_onnx_slots.py [--hidden 512] [--layers 4] [--reps 20] [--threads 1]

One run builds a Llama-like base (random weights) and adapters on all seven linear
projections of every layer: LoRA r=16 and r=8, MoRA type 1 and type 6 (r=8); exports
(same exporter settings) the merged graph of LoRA r=16, MoRA t1 and MoRA t6, a slots
graph per family (LoRA; MoRA t1; MoRA t6; validated as `adapters export --slots` does),
and a mixed graph of 8 adapters (4 LoRA of ranks 4-32, 2 MoRA t1, 2 MoRA t6). Then, on
the CPU provider, interleaved and shuffled in one loop so drift hits all alike:

1. switching: on ONE LoRA slots session, runs at 1x16 with the same adapter every time vs
   alternating two adapters (ranks 16 and 8) every run; the difference of medians is the
   cost added per switch (target < 1 ms). The alternative, loading a merged session per
   adapter, is timed as session creation of the merged LoRA graph.
2. latency at 1x128, adapter active on its slots session vs the merged graph of the same
   adapter: LoRA (target <= 1.15x), MoRA t1 and t6 (target <= 1.3x); and MoRA t1/t6 as a
   dense factorisation (`A = core(M) C`, `B = D`, fed to the LoRA slots: rank r_hat for t1,
   n_blocks*r_hat for t6) vs the structured operators.
3. a mixed batch of 8 rows x 128 tokens, 8 different adapters, in one run vs 8 single-adapter
   runs of 1x128 (each on its family's slots session, its adapter file active).

Prints medians (ms), ratios of medians and the median of per-repetition ratios ("paired").
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(folder: Path, hidden: int, layers: int, vocab: int) -> tuple[int, dict[str, tuple[int, int]]]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    inter = hidden * 11 // 4
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=512, tie_word_embeddings=False, use_cache=False)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    kv = hidden // 128 * 64
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj": (hidden, hidden), f"{p}.self_attn.k_proj": (hidden, kv),
                       f"{p}.self_attn.v_proj": (hidden, kv), f"{p}.self_attn.o_proj": (hidden, hidden),
                       f"{p}.mlp.gate_proj": (hidden, inter), f"{p}.mlp.up_proj": (hidden, inter),
                       f"{p}.mlp.down_proj": (inter, hidden)})
    return sum(p.numel() for p in model.parameters()), shapes


def _session(path: Path, threads: int):
    """A CPU session whose worker threads do not spin after a run (see bench_onnx_latency)."""
    import onnxruntime as ort

    from exporters.providers import quiet_ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with quiet_ort():
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _timed(runs: dict, reps: int, seed: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
        fn()
    shuffle = random.Random(seed)
    for _ in range(reps):
        order = list(runs)
        shuffle.shuffle(order)
        for k in order:
            t = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _med(v: list[float]) -> float:
    return statistics.median(v) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    from exporters.onnx_export import export_merged_onnx
    from exporters.ort_adapter import Activation, write_adapter_file
    from exporters.slot_layout import SlotLayout, bind, fit, parameters
    from exporters.slot_ops import mora_dense_matrices
    from exporters.slots import BaseModel, export_slots_onnx
    from mora_core.adapter import load_adapter
    from tests.builders import write_lora_adapter, write_mora_adapter

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-slots-"))
    try:
        t0 = time.perf_counter()
        n_params, shapes = make_base(tmp / "base", args.hidden, args.layers, args.vocab)
        base = tmp / "base"
        lora = {r: load_adapter(write_lora_adapter(tmp / f"lora{r}", base, "llama", TARGETS, r=r, seed=r))
                for r in (4, 8, 16, 32)}
        mora = {(t, s): load_adapter(write_mora_adapter(tmp / f"mora{t}-{s}", shapes, mora_type=t, r=8, seed=s,
                                                        scale=0.01)) for t in (1, 6) for s in (1, 2)}
        m1, m6 = mora[(1, 1)], mora[(6, 1)]
        graphs = {}
        for name, ads in (("lora", [lora[16], lora[8]]), ("mora1", [m1, mora[(1, 2)]]), ("mora6", [m6, mora[(6, 2)]])):
            graphs[name] = export_slots_onnx(base, ads, tmp / f"slots-{name}", provider="cpu", kv_cache=False)
        eight = [lora[4], lora[8], lora[16], lora[32], mora[(1, 1)], mora[(1, 2)], mora[(6, 1)], mora[(6, 2)]]
        mixed = export_slots_onnx(base, eight, tmp / "mixed", mixed=True, provider="cpu", kv_cache=False)
        for name, ad in (("lora", lora[16]), ("mora1", m1), ("mora6", m6)):
            export_merged_onnx(base, [ad], [1.0], tmp / f"merged-{name}", provider="cpu", validate=False,
                               kv_cache=False)  # compared with the (plain) slots graphs at 1x128
        setup_s = time.perf_counter() - t0

        shapes_of = BaseModel(base).shapes
        files: dict[str, Path] = {}

        def pack(key: str, graph: str, adapter, params=None) -> Path:
            layout = SlotLayout.from_list(graphs[graph]["slots"])
            if params is None:
                params = parameters(fit(adapter.label, bind(adapter, shapes_of), layout, graph), 1.0, "float32")
            files[key] = tmp / f"{key}.onnx_adapter"
            write_adapter_file(files[key], params)
            return files[key]

        for r in (4, 8, 16, 32):
            pack(f"lora{r}", "lora", lora[r])
        for (t, s), ad in mora.items():
            pack(f"mora{t}-{s}", f"mora{t}", ad)
        for t, ad in ((1, m1), (6, m6)):  # MoRA as a dense factorisation, on the LoRA slots
            dense = {}
            for b in bind(ad, shapes_of):
                a_mat, b_mat = mora_dense_matrices(b.op.operator, b.op.m.float())
                dense[f"{b.module}.lora_A"] = a_mat.numpy()
                dense[f"{b.module}.lora_B"] = b_mat.numpy()
            pack(f"dense{t}", "lora", None, dense)

        th = args.threads
        sess = {name: _session(tmp / f"slots-{name}" / "model.onnx", th) for name in graphs}
        merged = {name: _session(tmp / f"merged-{name}" / "model.onnx", th) for name in graphs}
        s_mixed = _session(tmp / "mixed" / "model.onnx", th)
        act = {k: Activation(p) for k, p in files.items()}
        rng = np.random.default_rng(0)

        def feed(b: int, s: int) -> dict:
            ids = rng.integers(0, args.vocab, size=(b, s), dtype=np.int64)
            return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

        print(f"model     Llama-like {n_params / 1e6:.1f}M params, float32, adapters on {len(TARGETS)} projections x "
              f"{args.layers} layers; CPU provider, {th} thread(s), {args.reps} reps; set-up {setup_s:.0f} s")
        print(f"graphs    validated: slots {', '.join(k for k, g in graphs.items() if g['validation']['passed'])}; "
              f"mixed {'yes' if mixed['validation']['passed'] else 'NO'} "
              f"(max abs diff {max(g['validation']['max_abs_diff'] for g in [*graphs.values(), mixed]):.2g})")

        # 1. switching
        f16 = feed(1, 16)
        flip = {"i": 0}

        def alternate():
            flip["i"] ^= 1
            sess["lora"].run(None, f16, act["lora16" if flip["i"] else "lora8"].options)

        t = _timed({"same": lambda: sess["lora"].run(None, f16, act["lora16"].options),
                    "alternate": alternate,
                    "none": lambda: sess["lora"].run(None, f16)}, args.reps * 3, 1)
        loads = []
        for _ in range(5):
            t1 = time.perf_counter()
            _session(tmp / "merged-lora" / "model.onnx", th)
            loads.append(time.perf_counter() - t1)
        switch = _med(t["alternate"]) - _med(t["same"])
        print("\n1. switching adapters on one session (1x16)")
        print(f"   same adapter {_med(t['same']):.3f} ms   alternating {_med(t['alternate']):.3f} ms   "
              f"no adapter {_med(t['none']):.3f} ms")
        print(f"   added per switch {switch:+.3f} ms (target < 1 ms); reloading a merged session instead "
              f"{_med(loads):.1f} ms ({_med(loads) / max(abs(switch), 1e-3):.0f}x)")

        # 2. latency at 1x128
        f128 = feed(1, 128)
        runs = {
            "merged lora": lambda: merged["lora"].run(None, f128),
            "slots lora": lambda: sess["lora"].run(None, f128, act["lora16"].options),
            "merged mora1": lambda: merged["mora1"].run(None, f128),
            "slots mora1": lambda: sess["mora1"].run(None, f128, act["mora1-1"].options),
            "dense mora1": lambda: sess["lora"].run(None, f128, act["dense1"].options),
            "merged mora6": lambda: merged["mora6"].run(None, f128),
            "slots mora6": lambda: sess["mora6"].run(None, f128, act["mora6-1"].options),
            "dense mora6": lambda: sess["lora"].run(None, f128, act["dense6"].options),
        }
        t = _timed(runs, args.reps, 2)

        def ratio(a: str, b: str) -> str:
            paired = statistics.median(x / y for x, y in zip(t[a], t[b]))
            return f"{_med(t[a]) / _med(t[b]):.3f} (paired {paired:.3f})"

        print("\n2. latency 1x128, adapter active (slots) vs merged graph of the same adapter")
        for k in runs:
            print(f"   {k:<13} {_med(t[k]):8.2f} ms")
        print(f"   LoRA r=16  slots/merged {ratio('slots lora', 'merged lora')}   target <= 1.15")
        print(f"   MoRA t1    slots/merged {ratio('slots mora1', 'merged mora1')}   target <= 1.3")
        print(f"   MoRA t6    slots/merged {ratio('slots mora6', 'merged mora6')}   target <= 1.3")
        print(f"   MoRA t1    dense/structured {ratio('dense mora1', 'slots mora1')}")
        print(f"   MoRA t6    dense/structured {ratio('dense mora6', 'slots mora6')}")

        # 3. mixed batch
        f8 = feed(8, 128)
        index = np.arange(8, dtype=np.int64)
        singles = [("lora", "lora4"), ("lora", "lora8"), ("lora", "lora16"), ("lora", "lora32"),
                   ("mora1", "mora1-1"), ("mora1", "mora1-2"), ("mora6", "mora6-1"), ("mora6", "mora6-2")]
        rows = [{k: v[i:i + 1] for k, v in f8.items()} for i in range(8)]

        def eight_runs():
            for (g, key), row in zip(singles, rows):
                sess[g].run(None, row, act[key].options)

        t = _timed({"mixed": lambda: s_mixed.run(None, {**f8, "adapter_index": index}), "eight": eight_runs},
                   max(5, args.reps // 2), 3)
        paired = statistics.median(x / y for x, y in zip(t["mixed"], t["eight"]))
        print("\n3. 8 rows x 128 tokens, 8 different adapters (4 LoRA r=4..32, 2 MoRA t1, 2 MoRA t6)")
        print(f"   one mixed run {_med(t['mixed']):.2f} ms   8 single-adapter runs {_med(t['eight']):.2f} ms   "
              f"mixed/8 singles {_med(t['mixed']) / _med(t['eight']):.3f} (paired {paired:.3f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
