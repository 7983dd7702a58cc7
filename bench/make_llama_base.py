"""Write a random-weight Llama base folder of a real model's shapes, one tensor at a time.

    python bench/make_llama_base.py OUT --shapes tinyllama-1.1b [--dtype bfloat16] [--shard-gb 2]

Shapes: `bench-100m` (the ~106M model of bench_onnx_export.py), `tinyllama-1.1b`
(TinyLlama-1.1B: hidden 2048, 22 layers, GQA 32/4 heads, vocab 32000) and `llama-3.2-3b`
(hidden 3072, 28 layers, GQA 24/8 heads, vocab 128256, tied embeddings). Weights are
N(0, 0.02) (norms 1.0), written tensor by tensor into safetensors shards with an index,
so writing a 3B model never holds more than one tensor; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES: dict[str, dict] = {
    "bench-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000, max_position_embeddings=512,
                       tie_word_embeddings=False),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0),
}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM checkpoint holds, in checkpoint order."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out.update({f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (h, h),
                    f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
                    f"{p}.self_attn.o_proj.weight": (h, h), f"{p}.post_attention_layernorm.weight": (h,),
                    f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                    f"{p}.mlp.down_proj.weight": (h, i)})
    out["model.norm.weight"] = (h,)
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def write_base(folder: Path, shapes_name: str, dtype: str = "bfloat16", shard_bytes: int = 2 << 30,
               seed: int = 0) -> int:
    """Write the folder; returns the parameter count."""
    import torch
    from transformers import LlamaConfig

    from mora_core.safetensors_io import PlannedTensor, dtype_code, encode_header

    cfg = dict(SHAPES[shapes_name])
    tdtype = getattr(torch, dtype)
    shapes = tensor_shapes(cfg)
    code = dtype_code(tdtype)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for name, shape in shapes.items():
        t = PlannedTensor(name, code, shape)
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        with open(folder / shard_name, "wb") as out:  # header, then the tensors back to back in its order
            out.write(encode_header(shard, {"format": "pt"}))
            for t in shard:
                if len(t.shape) == 1:
                    value = torch.ones(t.shape, dtype=tdtype)
                else:
                    value = (torch.randn(t.shape, generator=gen) * 0.02).to(tdtype)
                out.write(value.contiguous().view(torch.uint8).numpy().tobytes())
                weight_map[t.name] = shard_name
                del value
    if len(shards) > 1:
        total = sum(t.nbytes for s in shards for t in s)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = LlamaConfig(**cfg, use_cache=False, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = tdtype
    config.save_pretrained(str(folder))
    n = 0
    for shape in shapes.values():
        k = 1
        for d in shape:
            k *= d
        n += k
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()
    n = write_base(args.out, args.shapes, args.dtype, int(args.shard_gb * (1 << 30)))
    print(f"{args.out}: {args.shapes}, {n / 1e9:.2f}B parameters, {args.dtype}")


if __name__ == "__main__":
    main()
