"""Generation speed of an exported KV-cache graph (~100M Llama-like, MoRA + LoRA merged), one run.

    python bench/bench_generate.py [--layers 8] [--hidden 768] [--vocab 32000] [--reps 5] [--new 64]

Prints medians and ratios measured in the same run, on the CPU provider:

1. decode latency per token at a context of 512 vs 32 tokens through the cache (our
   graph, our ONNX Runtime loop), with the no-cache graph's ratio beside it (target:
   KV ratio <= 1.5x);
2. tokens/s of our graph in onnxruntime-genai vs the graph onnxruntime-genai's own
   model builder makes from the same merged folder (target >= 0.9x), and whether the
   builder's graph passes our generation validation. "ours" is the default export (for
   Llama: `exporters.fused_decoder`, fused ONNX Runtime ops, no trace); the torch
   exporter's traced graph (`graph_writer="torch"`) is measured beside it;
3. tokens/s of our graph (genai) vs PyTorch eager `generate` with the adapters applied
   unmerged (the reference a user would otherwise serve).

Random weights; nothing is downloaded. Temp data under /tmp, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def make_inputs(tmp: Path, hidden: int, layers: int, vocab: int, inter: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.builders import write_bpe_tokenizer, write_lora_adapter, write_mora_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 192),
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(tmp / "base"))
    write_bpe_tokenizer(tmp / "base")
    kv = cfg.num_key_value_heads * 64
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj"] = (hidden, hidden)
        shapes[f"{p}.self_attn.v_proj"] = (hidden, kv)
    mora = write_mora_adapter(tmp / "mora", shapes, mora_type=6, r=8, scale=0.01)
    lora = write_lora_adapter(tmp / "lora", tmp / "base", "llama", ["q_proj", "v_proj"], r=16)
    return sum(p.numel() for p in model.parameters()), [mora, lora], [1.0, 0.5]


def decode_latencies(folders: list[Path], context: int, steps: int, reps: int) -> list[float]:
    """Median seconds per decode step after a prompt of `context` tokens (our ORT loop), per graph.

    The graphs take turns rep by rep, so a change of load on the shared machine hits them all alike.
    """
    from exporters.ort_decoder import OrtDecoder
    from exporters.providers import open_session

    def decoder(folder: Path) -> OrtDecoder:
        config = folder / "genai_config.json"  # cache dims for graphs whose inputs are symbolic (builder's)
        dims = json.loads(config.read_text())["model"]["decoder"] if config.is_file() else None
        session = open_session(folder / "model.onnx", "cpu")
        return OrtDecoder(session, dims["num_key_value_heads"], dims["head_size"]) if dims else OrtDecoder(session)

    decoders = [decoder(folder) for folder in folders]
    rng = np.random.default_rng(0)
    times: list[list[float]] = [[] for _ in folders]
    for _ in range(reps):
        ids = rng.integers(1, 200, size=(1, context), dtype=np.int64)
        for decoder, out in zip(decoders, times):
            mask = np.ones_like(ids)
            _, state = decoder.step(ids, mask, decoder.start(1))
            t = time.perf_counter()
            for _ in range(steps):
                mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
                _, state = decoder.step(np.asarray([[7]], dtype=np.int64), mask, state)
            out.append((time.perf_counter() - t) / steps)
    return [statistics.median(t) for t in times]


def genai_tps(folders: list[Path], prompt_len: int, new: int, reps: int) -> list[float]:
    """Median decode tokens/s in onnxruntime-genai (greedy, exactly `new` tokens), per graph.

    The graphs take turns rep by rep (after one warm-up run each), as in `decode_latencies`.
    """
    import onnxruntime_genai as og

    models = [og.Model(str(folder)) for folder in folders]
    prompt = (np.arange(prompt_len, dtype=np.int32) % 250 + 1)[None]
    rates: list[list[float]] = [[] for _ in folders]
    for r in range(reps + 1):
        for model, out in zip(models, rates):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=prompt_len + new, min_length=prompt_len + new, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(prompt)
            gen.generate_next_token()
            t, n = time.perf_counter(), 0
            while not gen.is_done():
                gen.generate_next_token()
                n += 1
            if r:  # the first run warms up
                out.append(n / (time.perf_counter() - t))
    return [statistics.median(r) for r in rates]


def torch_tps(base: Path, adapters, weights, prompt_len: int, new: int, reps: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from mora_core.forward import apply_unmerged

    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager").eval()
    prompt = torch.arange(prompt_len)[None] % 250 + 1
    rates = []
    with apply_unmerged(model, adapters, weights), torch.no_grad():
        for r in range(reps + 1):
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter()
            model.generate(prompt, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False, pad_token_id=0)
            t2 = time.perf_counter()
            if r:
                rates.append(new / ((t2 - t1) - (t1 - t)))  # decode only: minus one prefill
    return statistics.median(rates)


def builder_graph(tmp: Path, adapters, weights) -> tuple[Path, float]:
    from exporters.safetensors_out import merge_folder

    if (tmp / "builder" / "genai_config.json").is_file():
        return tmp / "builder", float("nan")  # --work: reused
    if not (tmp / "merged").is_dir():
        merge_folder(tmp / "base", adapters, tmp / "merged", weights)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp / "merged"),
                        "-o", str(tmp / "builder"), "-p", "fp32", "-e", "cpu", "-c", str(tmp / "hf-cache")],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"builder failed: {p.stderr[-2000:]}")
    return tmp / "builder", time.perf_counter() - t


def validate_builder(folder: Path, base: Path, adapters, weights) -> dict:
    """Our generation validation on the builder's graph (vs the base with the adapters unmerged)."""
    from transformers import AutoModelForCausalLM

    from exporters.generation_check import compare_generation, generation_prompts
    from exporters.ort_decoder import OrtDecoder
    from exporters.providers import open_session
    from mora_core.forward import apply_unmerged

    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    decoder = OrtDecoder(open_session(folder / "model.onnx", "cpu"), dec["num_key_value_heads"], dec["head_size"])
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager").eval()
    with apply_unmerged(model, adapters, weights):
        return compare_generation(decoder, model, generation_prompts(cfg["vocab_size"], 64), 1e-4, 1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per latency sample")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder (kept); exports already in it are reused (timings only)")
    args = ap.parse_args()

    from exporters.onnx_export import export_merged_onnx
    from mora_core.adapter import load_adapter

    tmp = args.work or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    if args.work:
        args.keep = True
        tmp.mkdir(parents=True, exist_ok=True)

    def export(name: str, **kw) -> tuple[dict, float]:
        if (tmp / name / "summary.json").is_file():
            return json.loads((tmp / name / "summary.json").read_text()), float("nan")
        t = time.perf_counter()
        s = export_merged_onnx(tmp / "base", adapters, weights, tmp / name, **kw)
        (tmp / name / "summary.json").write_text(json.dumps(s))
        return s, time.perf_counter() - t

    try:
        if (tmp / "base" / "config.json").is_file():
            from transformers import AutoConfig

            n_params = 0
            folders, weights = [tmp / "mora", tmp / "lora"], [1.0, 0.5]
            AutoConfig.from_pretrained(str(tmp / "base"))
        else:
            n_params, folders, weights = make_inputs(tmp, args.hidden, args.layers, args.vocab, args.intermediate)
        adapters = [load_adapter(f) for f in folders]
        kv, t_kv = export("kv", provider="cpu")
        traced, t_traced = export("traced", graph_writer="torch", validate=False)
        plain, _ = export("plain", kv_cache=False, validate=False)
        builder, t_builder = builder_graph(tmp, adapters, weights)
        print(f"model            Llama-like {n_params / 1e6:.1f}M parameters, float32, CPU provider, "
              f"MoRA type 6 + LoRA (weights {weights})")
        print(f"our export       {t_kv:7.1f} s (merge + export + validation; generation check "
              f"{kv['validation']['comparisons']['generation']['steps']} steps, max abs "
              f"{kv['validation']['comparisons']['generation']['max_abs_diff']:.2g})")
        print(f"  graph writer   {kv['export']['exporter']}; export stage {kv['seconds']['export']} s "
              f"(traced graph: {traced['seconds']['export']} s, whole call {t_traced:.1f} s without validation)")
        print(f"genai builder    {t_builder:7.1f} s (from the merged safetensors folder, no validation)")

        names = ("kv", "traced", "plain")
        lat = {}
        for c in (32, 512):
            medians = decode_latencies([Path(x["output"]) for x in (kv, traced, plain)], c, args.steps, args.reps)
            lat.update({(name, c): m for name, m in zip(names, medians)})
        print("\ndecode latency per token (our ORT loop, median of", args.reps, "x", args.steps,
              "steps, the graphs taking turns)")
        for name in ("kv", "traced", "plain"):
            a, b = lat[(name, 32)], lat[(name, 512)]
            target = "  (target <= 1.5x)" if name == "kv" else ""
            print(f"  {name:<6} ctx 32 {a * 1e3:8.2f} ms   ctx 512 {b * 1e3:8.2f} ms   ratio {b / a:5.2f}x{target}")

        print(f"\ntokens/s in onnxruntime-genai (greedy, {args.new} new tokens, median of {args.reps}, "
              "the graphs taking turns)")
        for ctx in (32, 512):
            ours, theirs, old = genai_tps([Path(kv["output"]), builder, Path(traced["output"])], ctx, args.new,
                                          args.reps)
            print(f"  prompt {ctx:>3}: ours {ours:7.1f}   builder {theirs:7.1f}   ratio {ours / theirs:5.2f}x "
                  f"(target >= 0.9x)   traced graph {old:7.1f} ({old / theirs:5.2f}x)")
            if ctx == 32:
                ours32 = ours
        check = validate_builder(builder, tmp / "base", adapters, weights)
        print(f"  builder graph vs base + unmerged adapters (our generation check): "
              f"{'pass' if check['passed'] else 'FAIL'}, max abs {check['max_abs_diff']:.3g}, "
              f"worst {check['worst_ratio']:.3g}x tolerance at {check['worst_case']}")

        eager = torch_tps(tmp / "base", adapters, weights, 32, args.new, max(1, args.reps // 2))
        print(f"\nPyTorch eager generate, adapters unmerged: {eager:7.1f} tokens/s; "
              f"ours in genai {ours32:7.1f} tokens/s ({ours32 / eager:.2f}x)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
