"""A transformers model for a base folder, built from its config (no download), and its weights.

The architecture comes from `config.json` through `from_config`; weights are read from
the folder's safetensors files by mora_core and bound to the model's own parameter
names with mora_core's `NameResolver` (checkpoints name the same tensor `h.0.attn...`
or `transformer.h.0.attn...`, `bert.encoder...` or `encoder...`). Only architectures
whose export and validation are tested are accepted; anything else is an
`ExportError` naming the model type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters.errors import ExportError
from mora_core.checkpoint import Checkpoint
from mora_core.plan import NameResolver

# model_type -> task ("causal-lm": logits; "encoder": last_hidden_state)
SUPPORTED: dict[str, str] = {
    "llama": "causal-lm",
    "mistral": "causal-lm",
    "qwen2": "causal-lm",
    "gpt2": "causal-lm",
    "bert": "encoder",
}
OUTPUT_NAME = {"causal-lm": "logits", "encoder": "last_hidden_state"}
PADDING_SIDE = {"causal-lm": "left", "encoder": "right"}


def load_config(base_dir: Path):
    """The base's transformers config; `ExportError` when missing or not a supported type."""
    from transformers import AutoConfig

    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise ExportError(f"{path}: not found (the ONNX export builds the architecture from config.json)")
    try:
        config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError(f"{path}: not a transformers config this version understands "
                          f"({str(exc).splitlines()[0][:160]})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        arch = ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise ExportError(f"{path}: architecture {arch} (model_type {model_type!r}) cannot be exported to "
                          f"ONNX here; supported: {', '.join(sorted(SUPPORTED))}")
    config.use_cache = False
    return config


def task_of(config) -> str:
    return SUPPORTED[config.model_type]


def max_positions(config) -> int:
    """The longest sequence the model accepts (position table size), capped for validation."""
    for key in ("max_position_embeddings", "n_positions"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return 512


def build_model(config, untie: bool = False) -> torch.nn.Module:
    """A float32 model in eval mode from `config`; `untie` gives lm_head its own matrix."""
    from transformers import AutoModel, AutoModelForCausalLM

    if untie:
        config.tie_word_embeddings = False
    cls = AutoModelForCausalLM if task_of(config) == "causal-lm" else AutoModel
    try:
        model = cls.from_config(config, attn_implementation="eager", dtype=torch.float32)
    except Exception as exc:  # a config transformers accepts but cannot instantiate
        raise ExportError(f"architecture {config.model_type}: cannot build the model from config.json "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    return model.eval()


def tied_output(model: torch.nn.Module) -> dict[str, str]:
    """{output-embedding weight name: input-embedding weight name} when the model ties them."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings()
    if out_emb is None or out_emb.weight is not in_emb.weight:
        return {}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    by_module = {m: n for n, m in model.named_modules()}
    return {f"{by_module[out_emb]}.weight": f"{by_module[in_emb]}.weight"} if id(in_emb.weight) in names else {}


@dataclass
class BaseWeights:
    """The base's tensors under the model's names (float32), and what was left aside."""

    tensors: dict[str, torch.Tensor]
    ignored: list[str]  # checkpoint tensors the model has no place for (e.g. a pretraining head)
    tied: dict[str, str]  # tied tensor the checkpoint omits -> the tensor it shares


def read_base_weights(base: Checkpoint, model: torch.nn.Module) -> BaseWeights:
    """Read every base tensor, bind it to the model's parameter names, check nothing is missing."""
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    resolver = NameResolver(list(state))
    tensors: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for f in base.files:
        for name, value in f.read_all().items():
            target = resolver.resolve(name)
            if target is None:
                ignored.append(name)
                continue
            if tuple(value.shape) != tuple(state[target].shape):
                raise ExportError(f"{f.path}: tensor {name} is {list(value.shape)} but the architecture in "
                                  f"config.json expects {list(state[target].shape)} for {target}")
            tensors[target] = value.to(torch.float32) if value.is_floating_point() else value
    tied = {a: s for a, s in tied_output(model).items() if a not in tensors and s in tensors}
    missing = sorted(n for n in params if n not in tensors and n not in tied)
    if missing:
        raise ExportError(f"{base.root}: the weights have no tensor for {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + "; does config.json match the safetensors files?")
    return BaseWeights(tensors, ignored, tied)


def load_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model's parameters (keeps ties: a shared parameter is written once)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
