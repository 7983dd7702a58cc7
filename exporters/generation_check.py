"""Validation of a KV-cache graph *while generating*: prefill, then greedy decode through the cache.

The ONNX side runs the graph on ONNX Runtime step by step, feeding its own presents back
as the next past (`exporters.ort_decoder.OrtDecoder`); the reference is a PyTorch model
(the base with the adapters applied unmerged, in practice) driven with transformers'
own `DynamicCache`. Both get the same tokens (the reference's greedy choice: teacher
forcing), so every step compares like with like:

- logits of every new token position: `|onnx - ref| <= atol + rtol*|ref|`;
- the greedy token: ONNX's argmax must equal the reference's, except where the
  reference's top-2 margin is a near-tie, `margin <= 2*(atol + rtol*|top1|)` (within
  tolerance either token may win); near-ties are counted in the report.

int4 graphs (`norm=True`) are judged as their other comparisons are: the relative RMS
error of each step's logits (`||onnx - ref|| / ||ref||`) within `rtol`; their greedy
tokens are not required to agree (4-bit rounding flips near-flat logits; random-weight
models have many), the disagreements are counted in the report instead.

Since the reference alone chooses the tokens, its side runs first and is recorded
(`record_generation`: the fed ids, the mask and the logits of every step, a few MB), then
the graph replays the same inputs (`compare_recorded`): validation frees the PyTorch model
before ONNX Runtime loads the graph, so the two are never in memory together.

Cases: one unpadded row, and a batch of 3 rows left-padded to different lengths
(position ids `cumsum(mask) - 1`, as transformers' `generate` and onnxruntime-genai use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from exporters.ort_decoder import OrtDecoder, positions
from exporters.validate import diff_stats

GENERATION_STEPS = 16
NAME = "generation vs base + unmerged adapters (PyTorch cache)"


def generation_prompts(vocab_size: int, max_len: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) prompts: batch 1 unpadded, batch 3 left-padded to 3 lengths; fits `max_len`."""
    rng = np.random.default_rng(seed)
    seq = max(1, min(9, max_len - GENERATION_STEPS - 1))
    out = []
    for batch, lengths in ((1, (min(7, seq),)), (3, (seq, max(1, 2 * seq // 3), max(1, seq // 3)))):
        width = max(lengths)
        ids = rng.integers(0, vocab_size, size=(batch, width), dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, n in enumerate(lengths):
            mask[row, width - n:] = 1
        ids = np.where(mask == 1, ids, 0)
        out.append((ids, mask))
    return out


def _torch_step(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, cache) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions(mask, ids.shape[1])), past_key_values=cache,
                    use_cache=True, return_dict=True)
    return out.logits.float().numpy()


@dataclass(frozen=True)
class Step:
    """One step of the reference's generation: what was fed and the logits it gave."""

    input_ids: np.ndarray  # [batch, new]: the prompt at step 0, then the reference's greedy tokens
    attention_mask: np.ndarray  # [batch, past + new]
    logits: np.ndarray  # [batch, new, vocab], float32


@dataclass(frozen=True)
class RecordedGeneration:
    """The reference's prefill and greedy decode steps for one prompt."""

    prompt: tuple[np.ndarray, np.ndarray]  # (ids, mask) as given
    steps: list[Step]


def record_generation(reference: torch.nn.Module, prompts: Sequence[tuple[np.ndarray, np.ndarray]],
                      steps: int = GENERATION_STEPS) -> list[RecordedGeneration]:
    """Prefill + `steps` greedy decode steps of each prompt on the reference, with its own cache.

    Teacher forcing makes the reference alone define the path (every step feeds the
    reference's greedy token), so its logits can be recorded first and the model freed
    before ONNX Runtime loads the graph: the two never need to be in memory together.
    The record is small (one row of logits per generated token).
    """
    from transformers import DynamicCache

    out = []
    for ids, mask in prompts:
        batch = ids.shape[0]
        cache = DynamicCache()
        record = []
        new_ids, total_mask = ids, mask
        for _ in range(steps + 1):  # step 0 is the prefill
            logits = _torch_step(reference, new_ids, total_mask, cache)
            record.append(Step(new_ids, total_mask, logits))
            new_ids = logits[:, -1].astype(np.float64).argmax(axis=-1)[:, None].astype(np.int64)
            total_mask = np.concatenate([total_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        del cache
        out.append(RecordedGeneration((ids, mask), record))
    return out


def compare_recorded(decoder: OrtDecoder, recorded: Sequence[RecordedGeneration], atol: float, rtol: float,
                     norm: bool = False) -> dict[str, Any]:
    """Run each recorded generation's inputs through the graph (its own cache) and compare every step."""
    cases = []
    steps = 0
    for rec in recorded:
        ids, mask = rec.prompt
        batch = ids.shape[0]
        steps = len(rec.steps) - 1
        state = decoder.start(batch)
        worst: dict[str, Any] = {"worst_ratio": 0.0, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "max_rel_rms": 0.0,
                                 "min_top1_agreement": 1.0, "step": 0}
        mismatch = None
        near_ties = disagreements = 0
        for step, ref in enumerate(rec.steps):
            new_ids, total_mask, ref_logits = ref.input_ids, ref.attention_mask, ref.logits
            onnx_logits, state = decoder.step(new_ids, total_mask, state)
            stats = diff_stats(onnx_logits, ref_logits, total_mask[:, -new_ids.shape[1]:], atol, rtol, norm)
            worst["max_abs_diff"] = max(worst["max_abs_diff"], stats["max_abs_diff"])
            worst["max_rel_diff"] = max(worst["max_rel_diff"], stats["max_rel_diff"])
            worst["max_rel_rms"] = max(worst["max_rel_rms"], stats.get("rel_rms", float("inf")))
            worst["min_top1_agreement"] = min(worst["min_top1_agreement"], stats.get("top1_agreement", 0.0))
            if stats["worst_ratio"] > worst["worst_ratio"]:
                worst.update(worst_ratio=stats["worst_ratio"], step=step)
            if "shape_mismatch" in stats or "non_finite" in stats:
                break
            last_ref = ref_logits[:, -1].astype(np.float64)
            ref_next = last_ref.argmax(axis=-1)
            onnx_next = onnx_logits[:, -1].astype(np.float64).argmax(axis=-1)
            top2 = np.sort(last_ref, axis=-1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
            tie = 2 * (atol + rtol * np.abs(top2[:, 1]))
            for row in np.nonzero(onnx_next != ref_next)[0]:
                if norm:
                    disagreements += 1
                elif margin[row] <= tie[row]:
                    near_ties += 1
                elif mismatch is None:
                    mismatch = {"step": step, "row": int(row), "onnx": int(onnx_next[row]),
                                "reference": int(ref_next[row]), "margin": float(margin[row]),
                                "near_tie": float(tie[row])}
        cases.append({"batch": int(batch), "prompt": int(ids.shape[1]),
                      "padded_rows": int((mask == 0).any(axis=1).sum()), "steps": steps,
                      **worst, "near_ties": near_ties, "top1_disagreements": disagreements,
                      "token_mismatch": mismatch})
    worst_case = max(cases, key=lambda c: c["worst_ratio"])
    return {
        "name": NAME,
        "passed": all(c["worst_ratio"] <= 1.0 and c["token_mismatch"] is None for c in cases),
        "steps": steps,
        "max_abs_diff": max(c["max_abs_diff"] for c in cases),
        "max_rel_diff": max(c["max_rel_diff"] for c in cases),
        "max_rel_rms": max(c["max_rel_rms"] for c in cases),
        "min_top1_agreement": min(c["min_top1_agreement"] for c in cases),
        "criterion": "rel_rms" if norm else "elementwise",
        "worst_ratio": worst_case["worst_ratio"],
        "worst_case": {k: worst_case[k] for k in ("batch", "prompt", "step")},
        "near_ties": sum(c["near_ties"] for c in cases),
        "top1_disagreements": sum(c["top1_disagreements"] for c in cases),
        "cases": cases,
    }


def compare_generation(decoder: OrtDecoder, reference: torch.nn.Module,
                       prompts: Sequence[tuple[np.ndarray, np.ndarray]], atol: float, rtol: float,
                       steps: int = GENERATION_STEPS, norm: bool = False) -> dict[str, Any]:
    """Prefill + `steps` greedy decode steps of each prompt on both sides; the comparison report.

    `record_generation` then `compare_recorded`: the same report whichever side runs first.
    """
    return compare_recorded(decoder, record_generation(reference, prompts, steps), atol, rtol, norm)


def generation_failure_line(comparison: dict[str, Any], provider: str, atol: float, rtol: float) -> str:
    """The one line a failed generation comparison is reported with."""
    bad = next((c for c in comparison["cases"] if c["token_mismatch"] is not None), None)
    if comparison["worst_ratio"] <= 1.0 and bad is not None:
        m = bad["token_mismatch"]
        return (f"validation failed on {provider}: greedy token differs from {comparison['name']} at batch "
                f"{bad['batch']} row {m['row']}, step {m['step']}: ONNX {m['onnx']}, reference {m['reference']} "
                f"(top-2 margin {m['margin']:.3g} > near-tie {m['near_tie']:.3g}); nothing was written")
    w = comparison["worst_case"]
    return (f"validation failed on {provider}: ONNX {comparison['name']} differs at batch {w['batch']}, "
            f"step {w['step']}: max abs diff {comparison['max_abs_diff']:.3g}, max rel diff "
            f"{comparison['max_rel_diff']:.3g} exceed atol {atol:g} + rtol {rtol:g}*|ref| "
            f"({comparison['worst_ratio']:.3g}x the tolerance); nothing was written")
