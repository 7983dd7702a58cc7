"""`genai_config.json` for a KV-cache decoder graph, so `onnxruntime_genai.Model(OUT)` loads it.

The file names the graph, its input/output names (the `%d` patterns of the cache), the
model's shape (heads, kv heads, head size, hidden size, layers, context length, vocab
size), the special token ids and search defaults (greedy unless the base's
`generation_config.json` says otherwise). It is written beside the graph with the
tokenizer files the export copies from the base folder. `past_present_share_buffer` is
false for traced graphs: they return past + new as their presents (Optimum's layout) and
cannot write into a preallocated buffer. Fused graphs (`exporters.fused_decoder`,
`share_buffer=True`) get true: their GroupQueryAttention writes each step's keys/values in
place into genai's max-length buffers (no copy of the whole past per layer and step; 1.15x
decode tokens/s at a 512-token prompt in bench/bench_generate.py), while fed a plain past
they still return past + new (our loop, our validation). Special ids outside the vocabulary (toy configs keep
GPT-2's 50256 with a small vocabulary) are dropped, as genai refuses them; a model left
without an eos id gets its pad id (else 0) as eos.

`type`: Llama, Mistral and Qwen2 keep their names; genai's own "gpt2" type expects a
combined `past_%d` cache, not the separate key/value tensors of our graph, so GPT-2
graphs are described with genai's generic "decoder" type (the runtime only feeds the
graph; the architecture is inside it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporters.errors import ExportError
from exporters.onnx_layout import (
    GENAI_CONFIG_NAME,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
)

if TYPE_CHECKING:
    from exporters.onnx_graph import GraphSpec

__all__ = ["GENAI_CONFIG_NAME", "genai_config", "special_ids"]
# model_type -> onnxruntime-genai's model type (the runtime knows these decoder-only families)
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "decoder"}


def _token_id(value: Any, where: str) -> int | list[int] | None:
    """A token id (or a list of them) from a config, else `ExportError` naming where it came from."""
    def one(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
            raise ExportError(f"{where}: {str(value)[:60]} is not a token id or a list of them")
        return v

    if value is None:
        return None
    if isinstance(value, list):
        if len(value) > 1024:
            raise ExportError(f"{where}: a list of {len(value)} token ids")
        return [one(v) for v in value]
    return one(value)


def _first_id(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _number(gen: dict[str, Any], key: str, default: float, low: float, high: float, where: Path) -> float:
    value = gen.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ExportError(f"{where}: {key} {str(value)[:40]} is not a number from {low:g} to {high:g}")
    return float(value)


def special_ids(config, base_dir: Path) -> dict[str, Any]:
    """bos/eos/pad ids and sampling defaults: generation_config.json first, then config.json.

    Both files are read under the folder rule and the strict JSON reader; a value of the
    wrong type (an id that is not an integer, a temperature that is not a number) is an
    `ExportError` naming the file; the export calls this first, before the slow part.
    """
    from exporters.export_folder import read_json_object

    gen_path = Path(base_dir) / "generation_config.json"
    gen: dict[str, Any] = read_json_object(Path(base_dir), gen_path.name, "generation config") or {}

    def pick(key: str) -> int | list[int] | None:
        if gen.get(key) is not None:
            return _token_id(gen[key], f"{gen_path}: {key}")
        return _token_id(getattr(config, key, None), f"{Path(base_dir) / 'config.json'}: {key}")

    vocab = int(config.vocab_size)

    def valid(value: Any) -> Any:  # onnxruntime-genai refuses ids outside [0, vocab_size)
        if isinstance(value, list):
            kept = [v for v in value if 0 <= v < vocab]
            return kept if len(kept) > 1 else (kept[0] if kept else None)
        return value if value is not None and 0 <= value < vocab else None

    eos = valid(pick("eos_token_id"))
    bos = valid(_first_id(pick("bos_token_id")))
    pad = valid(_first_id(pick("pad_token_id")))
    if pad is None:
        pad = _first_id(eos) if eos is not None else 0
    do_sample = gen.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise ExportError(f"{gen_path}: do_sample {str(do_sample)[:40]} is not true or false")
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": do_sample,
            "temperature": _number(gen, "temperature", 1.0, 0.0, 1e6, gen_path),
            "top_k": int(_number(gen, "top_k", 50, 0, 2**31 - 1, gen_path)) or 50,
            "top_p": _number(gen, "top_p", 1.0, 0.0, 1.0, gen_path) or 1.0}


def genai_config(config, spec: GraphSpec, graph_name: str, base_dir: Path, context_length: int,
                 share_buffer: bool = False) -> dict[str, Any]:
    """The genai_config.json content for the KV graph `graph_name` with signature `spec`.

    `share_buffer`: the graph can update genai's preallocated cache in place (fused graphs).
    """
    if not spec.kv_cache:
        raise ValueError("genai_config needs a KV-cache graph")
    ids = special_ids(config, base_dir)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    if "position_ids" in spec.input_names:
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": ids["bos_token_id"] if ids["bos_token_id"] is not None else ids["pad_token_id"],
            "context_length": int(context_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph_name,
                "head_size": spec.head_size,
                "hidden_size": int(config.hidden_size),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                            "present_value_names": PRESENT_VALUE},
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_heads,
            },
            "eos_token_id": ids["eos_token_id"] if ids["eos_token_id"] is not None else ids["pad_token_id"],
            "pad_token_id": ids["pad_token_id"],
            "type": GENAI_TYPES[config.model_type],
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": ids["do_sample"],
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(context_length),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": ids["temperature"],
            "top_k": ids["top_k"],
            "top_p": ids["top_p"],
        },
    }
