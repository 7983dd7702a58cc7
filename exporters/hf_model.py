"""A transformers model for a base folder, built from its config (no download), and its weights.

The architecture comes from `config.json` through `from_config`; `exporters.model_build`
builds it with parameters on the meta device and binds the folder's safetensors tensors
to the model's own names. Only architectures
whose export and validation are tested are accepted; anything else is an
`ExportError` naming the model type.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from exporters.errors import ExportError

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


def load_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model's parameters (keeps ties: a shared parameter is written once)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
