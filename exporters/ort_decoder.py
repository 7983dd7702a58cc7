"""One decoder step on ONNX Runtime, for KV-cache graphs and plain (no-cache) graphs alike.

Shared by validation (the ONNX side of the generation comparison) and `adapters
generate`'s own loop, so both drive a graph the same way. No torch: numpy and
onnxruntime only.

Contract of `OrtDecoder.step(input_ids, attention_mask, state)`:
- `input_ids` [batch, new] are the tokens of this call, `attention_mask`
  [batch, past + new] covers everything seen so far (left padding = 0s);
- position ids are `cumsum(mask) - 1` over the whole mask (padding clipped to 0), the
  same rule as transformers' `generate` and onnxruntime-genai, taken for the new tokens;
- returns the logits of the new tokens [batch, new, vocab] and the next state (the
  presents of a KV graph; for a plain graph, all ids so far: it re-runs the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def positions(mask: np.ndarray, new: int) -> np.ndarray:
    """Position ids of the last `new` tokens of `mask` ([batch, total], int64)."""
    pos = np.cumsum(mask, axis=1) - 1
    pos = np.where(mask == 0, 0, pos)
    return pos[:, mask.shape[1] - new:].astype(np.int64)


@dataclass
class DecoderState:
    """What a decoder carries between steps (opaque to callers)."""

    past: dict[str, np.ndarray] = field(default_factory=dict)
    ids: np.ndarray | None = None  # plain graphs: every id so far


class OrtDecoder:
    """Wraps an InferenceSession of a decoder graph (`logits` output).

    `kv_heads`/`head_size` are needed only for graphs whose past inputs leave those
    dimensions symbolic (onnxruntime-genai's builder does); ours declare them.
    `run_options` go to every run (a slots graph's active adapter: `ort_adapter.Activation`);
    `extra_feed` is fed as it is at every step (a mixed graph's `adapter_index`).
    """

    def __init__(self, session: Any, kv_heads: int | None = None, head_size: int | None = None,
                 run_options: Any = None, extra_feed: dict[str, np.ndarray] | None = None):
        self.session = session
        self.run_options = run_options
        self.extra_feed = dict(extra_feed or {})
        ins = {i.name: i for i in session.get_inputs()}
        if "input_ids" not in ins or "attention_mask" not in ins:
            raise ValueError(f"inputs are {list(ins)}, expected input_ids and attention_mask")
        outs = [o.name for o in session.get_outputs()]
        if "logits" not in outs:
            raise ValueError(f"outputs are {outs}, expected logits (a decoder graph)")
        self.input_names = set(ins)
        self.output_names = outs
        self.has_position_ids = "position_ids" in ins
        self.past_names = sorted((n for n in ins if n.startswith("past_key_values.")), key=_layer_order)
        self.kv_cache = bool(self.past_names)
        self.present_of = {n: "present." + n[len("past_key_values."):] for n in self.past_names}
        missing = [p for p in self.present_of.values() if p not in outs]
        if missing:
            raise ValueError(f"the graph takes past_key_values but has no output {missing[0]}")
        self._past_meta: dict[str, tuple[Any, int, int]] = {}
        for n in self.past_names:
            shape = ins[n].shape
            heads = shape[1] if isinstance(shape[1], int) else kv_heads
            size = shape[3] if isinstance(shape[3], int) else head_size
            if heads is None or size is None:
                raise ValueError(f"{n} has symbolic shape {shape}; give kv_heads and head_size")
            self._past_meta[n] = (ORT_FLOAT.get(ins[n].type, np.float32), heads, size)
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else None

    @property
    def layers(self) -> int:
        return len(self.past_names) // 2

    def start(self, batch: int) -> DecoderState:
        """The state before the prompt: an empty (length 0) past."""
        past = {}
        for n, (dtype, heads, size) in self._past_meta.items():
            past[n] = np.zeros((batch, int(heads), 0, int(size)), dtype=dtype)
        return DecoderState(past=past, ids=np.zeros((batch, 0), dtype=np.int64))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             state: DecoderState) -> tuple[np.ndarray, DecoderState]:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        new = input_ids.shape[1]
        if not self.kv_cache:
            ids = np.concatenate([state.ids, input_ids], axis=1)
            feed = {"input_ids": ids, "attention_mask": attention_mask, **self.extra_feed}
            if self.has_position_ids:
                feed["position_ids"] = positions(attention_mask, ids.shape[1])
            (logits,) = self.session.run(["logits"], feed, self.run_options)
            return logits[:, -new:], DecoderState(ids=ids)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **state.past, **self.extra_feed}
        if self.has_position_ids:
            feed["position_ids"] = positions(attention_mask, new)
        wanted = ["logits", *self.present_of.values()]
        out = self.session.run(wanted, feed, self.run_options)
        past = {n: out[1 + i] for i, n in enumerate(self.past_names)}
        return out[0], DecoderState(past=past)


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), parts[2]) if len(parts) == 3 and parts[1].isdigit() else (1 << 30, name)
