"""Export + validation time of a ~100M-parameter Llama-like model with a MoRA and a LoRA adapter.

    python bench/bench_onnx_export.py [--layers 8] [--hidden 768] [--vocab 32000]

Prints the parameter count and the exporter's own stage timings (merge, export,
validation) from one `export_merged_onnx` call (float32 by default, `--dtype float16`), on
the provider `auto` finds (CPU here). Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_base(folder: Path, hidden: int, layers: int, vocab: int, inter: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=512, tie_word_embeddings=False, use_cache=False)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args()

    from exporters.onnx_export import export_merged_onnx
    from mora_core.adapter import load_adapter
    from tests.models import write_lora_adapter, write_mora_adapter

    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-export-"))
    try:
        n_params = make_base(tmp / "base", args.hidden, args.layers, args.vocab, args.intermediate)
        shapes = {}
        for i in range(args.layers):
            p = f"model.layers.{i}"
            shapes[f"{p}.self_attn.q_proj"] = (args.hidden, args.hidden)
            shapes[f"{p}.self_attn.v_proj"] = (args.hidden, args.hidden)
        mora = write_mora_adapter(tmp / "mora", shapes, mora_type=6, r=8, scale=0.01)
        lora = write_lora_adapter(tmp / "lora", tmp / "base", "llama", ["q_proj", "v_proj"], r=16)
        adapters = [load_adapter(mora), load_adapter(lora)]
        t = time.perf_counter()
        s = export_merged_onnx(tmp / "base", adapters, [1.0, 0.5], tmp / "out", provider=args.provider,
                               dtype=args.dtype)
        wall = time.perf_counter() - t
        v = s["validation"]
        size = sum(f["bytes"] for f in s["files"].values())
        print(f"model          Llama-like, {n_params / 1e6:.1f}M parameters, {args.dtype}, {size / 1e6:.0f} MB ONNX")
        print(f"provider       {v['provider']} (requested {v['requested_provider']})")
        for stage in ("merge", "export", "validation"):
            print(f"{stage:<14} {s['seconds'][stage]:8.2f} s")
        print(f"export+valid.  {wall:8.2f} s (wall, one call)")
        print(f"max abs diff   {v['max_abs_diff']:.3g} (atol {v['atol']:g}), max rel {v['max_rel_diff']:.3g}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
