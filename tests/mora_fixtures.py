"""Builders for mora_core tests: base folders and adapter folders written as real files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mora_core.mora import mora_rank

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "mora"


def golden_dir() -> Path:
    """The paper-implementation vectors, in shared/ beside the checkout."""
    if not (GOLDEN / "cases.json").is_file():
        raise FileNotFoundError(f"golden vectors not found at {GOLDEN}")
    return GOLDEN


def write_mora_adapter(folder: Path, shapes: dict[str, tuple[int, int]], r: int = 8, mora_type: int = 1,
                       seed: int = 0, scale: float = 0.02, fan_in_fan_out: bool = False,
                       extra_config: dict | None = None) -> dict[str, torch.Tensor]:
    """A MoRA folder as the paper's peft fork saves it: two identical r_hat x r_hat copies.

    `shapes` maps module path -> (in_features, out_features). Returns the M per module.
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors, ms = {}, {}
    for module, (in_f, out_f) in shapes.items():
        rh = mora_rank(in_f, out_f, r, mora_type)
        m = torch.randn(rh, rh, generator=g) * scale
        ms[module] = m
        tensors[f"base_model.model.{module}.lora_A.weight"] = m
        tensors[f"base_model.model.{module}.lora_B.weight"] = m.clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "use_mora": True, "mora_type": mora_type, "r": r, "lora_alpha": 16,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}), "fan_in_fan_out": fan_in_fan_out,
           "bias": "none", "task_type": "CAUSAL_LM"}
    cfg.update(extra_config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return ms


def write_base(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
               config: dict | None = None) -> Path:
    """A model folder: one file, or `shards` files with an HF index, plus config/tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "tie_word_embeddings": False}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return folder


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out
