"""Tiny real transformers bases and adapter folders for the exporter tests and benches.

Bases are built from small configs with random weights and saved with
`save_pretrained` (config.json + model.safetensors, tied tensors omitted as
transformers does). Adapters are real files: MoRA folders in the layout of the
paper's peft fork (two identical `r_hat x r_hat` copies), LoRA folders written by
real `peft` with `init_lora_weights=False` so that B is non-zero.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.mora_fixtures import write_mora_adapter as write_mora_folder

VOCAB = 96
HIDDEN = 32


def _config(kind: str, **overrides):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = {"vocab_size": VOCAB, "use_cache": False}
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common)
    elif kind == "mistral":
        cfg = MistralConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
                            tie_word_embeddings=False, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, **common)
    elif kind == "bert":
        cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64, **common)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised model (causal LM, or the bare encoder for BERT)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(kind, **overrides)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # make norms and biases non-trivial so that mistakes show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def write_base(folder: Path, kind: str, seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> Path:
    """Save a tiny `kind` model as a transformers folder (config.json + model.safetensors)."""
    model = build_model(kind, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder))
    return folder


# module path (as in the base model) -> (in_features, out_features), for MoRA folders
def linear_shapes(kind: str, layers: int = 2, with_lm_head: bool = False) -> dict[str, tuple[int, int]]:
    """Targetable projections of the tiny `kind` models, with their (in, out) features."""
    kv = HIDDEN // 2  # 2 kv heads of 8
    out: dict[str, tuple[int, int]] = {}
    for i in range(layers):
        if kind in ("llama", "mistral", "qwen2"):
            p = f"model.layers.{i}"
            out.update({f"{p}.self_attn.q_proj": (HIDDEN, HIDDEN), f"{p}.self_attn.v_proj": (HIDDEN, kv),
                        f"{p}.mlp.down_proj": (64, HIDDEN)})
        elif kind == "gpt2":
            p = f"transformer.h.{i}"
            out.update({f"{p}.attn.c_attn": (HIDDEN, 3 * HIDDEN), f"{p}.mlp.c_fc": (HIDDEN, 4 * HIDDEN)})
        elif kind == "bert":
            p = f"encoder.layer.{i}"
            out.update({f"{p}.attention.self.query": (HIDDEN, HIDDEN), f"{p}.output.dense": (64, HIDDEN)})
    if with_lm_head:
        out["lm_head"] = (HIDDEN, VOCAB)
    return out


def write_mora_adapter(folder: Path, shapes: dict[str, tuple[int, int]], mora_type: int = 1, r: int = 8,
                       seed: int = 1, scale: float = 0.05, fan_in_fan_out: bool = False) -> Path:
    """A MoRA folder: `lora_A.weight == lora_B.weight == M` (`r_hat x r_hat`) per module."""
    write_mora_folder(folder, shapes, r=r, mora_type=mora_type, seed=seed, scale=scale,
                      fan_in_fan_out=fan_in_fan_out)
    return folder


def write_lora_adapter(folder: Path, base_dir: Path, kind: str, target_modules: list[str], r: int = 4,
                       seed: int = 2) -> Path:
    """A LoRA folder saved by real peft from the base at `base_dir`, with B non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(base_dir), attn_implementation="eager")
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, init_lora_weights=False,
                     fan_in_fan_out=kind == "gpt2")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(folder))
    return folder


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over the tiny vocabulary (`w0` .. `w94`, `[UNK]` = 95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    return folder
