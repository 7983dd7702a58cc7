"""A transformers model for a base folder, built from its config (no download), and its weights.

The architecture comes from `config.json` through `from_config`; `exporters.model_build`
builds it with parameters on the meta device and binds the folder's safetensors tensors
to the model's own names. Only architectures
whose export and validation are tested are accepted; anything else is an
`ExportError` naming the model type.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from exporters.errors import ExportError
from mora_core.checkpoint import Checkpoint, read_model_config
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


def load_config(base: Checkpoint | str | os.PathLike[str]):
    """The base's transformers config; `ExportError` when missing or not a supported type.

    Built from the `config.json` a `Checkpoint` already read (or, given a folder, read now)
    under the folder rule by the strict JSON reader, and handed to transformers as a dict:
    transformers' own reader would recurse on a document nested 200,000 deep.
    """
    from transformers import CONFIG_MAPPING

    root = base.root if isinstance(base, Checkpoint) else Path(base)
    path = root / "config.json"
    raw = base.config if isinstance(base, Checkpoint) else read_model_config(root)
    if not raw:
        raise ExportError(f"{path}: not found or empty (the ONNX export builds the architecture from config.json)")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        arch = ", ".join(a for a in raw.get("architectures") or [] if isinstance(a, str)) or model_type
        raise ExportError(f"{path}: architecture {str(arch)[:80]} (model_type {str(model_type)[:40]!r}) cannot be "
                          f"exported to ONNX here; supported: {', '.join(sorted(SUPPORTED))}")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as exc:  # transformers validates fields with ValueError, TypeError, KeyError...
        raise ExportError(f"{path}: not a {model_type} config this transformers understands "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    config.use_cache = False
    return config


def check_architecture(config, shapes: Mapping[str, tuple[int, ...]], where: Path) -> None:
    """Refuse a config.json that does not describe the weights, *before* the model is built.

    A config claiming 100,000 layers (or a hidden size of a million) would otherwise be
    allocated in full by `from_config` (23 GB before the kernel killed it). First a bound
    that costs nothing (each layer has at least one tensor), then the architecture is
    built on the `meta` device (shapes only, no memory) and every parameter's shape is
    compared with the checkpoint's tensor of the same name.
    """
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 < layers <= len(shapes):
        raise ExportError(f"{where}: num_hidden_layers {layers} in config.json, but the weights hold "
                          f"{len(shapes)} tensors; config.json does not describe these weights")
    with torch.device("meta"):
        model = build_model(copy.deepcopy(config))
    state = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    resolver = NameResolver(list(state))
    seen = set()
    for name, shape in shapes.items():
        target = resolver.resolve(name)
        if target is None:
            continue
        if tuple(shape) != state[target]:
            raise ExportError(f"{where}: tensor {name} is {list(shape)} but the architecture in config.json "
                              f"expects {list(state[target])} for {target}")
        seen.add(target)
    tied = tied_output(model)
    missing = sorted(n for n in params if n not in seen and not (n in tied and tied[n] in seen))
    if missing:
        raise ExportError(f"{where}: the weights have no tensor for {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + "; does config.json match the safetensors files?")


def task_of(config) -> str:
    return SUPPORTED[config.model_type]


def max_positions(config) -> int:
    """The longest sequence the model accepts (position table size), capped for validation."""
    for key in ("max_position_embeddings", "n_positions"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return 512


def cache_dims(config) -> tuple[int, int, int]:
    """(layers, kv heads, head size) of a decoder's KV cache, from its config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


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


def load_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model's parameters (keeps ties: a shared parameter is written once)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
