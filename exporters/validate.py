"""Numerical validation of an exported graph: what "equal to PyTorch" means, in numbers.

A comparison runs the same inputs through the ONNX session and a PyTorch reference and
looks only at the positions that carry tokens (attention_mask == 1): a padded position's
output is never served. Pass criterion, per element (numpy `allclose`):

    |onnx - ref| <= atol + rtol * |ref|

Reported per case and per comparison: `max_abs_diff`, `max_rel_diff` (|diff| / |ref| over
the elements where |ref| > atol, where a relative error means something) and
`worst_ratio` (max of |diff| / (atol + rtol |ref|); <= 1 passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# dtype of the exported graph -> (atol, rtol). float32 graphs differ from PyTorch by
# kernel summation order only (~1e-6 on logits); float16 graphs are compared with the
# float32 PyTorch references, so they carry the fp16 rounding of weights and activations.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-4),
    "float16": (2e-2, 2e-2),
    # int4: rtol bounds ||onnx - ref|| / ||ref|| per case (see `diff_stats`), atol unused. Measured
    # on random-weight models (exporters/quantize.py): 0.003-0.134 on the tiny test models, 0.335
    # on the 106M bench model; packing or scale bugs give 1.3-1.4
    "int4": (0.0, 0.5),
}


def tolerances(dtype: str, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """User values where given, else the defaults of the graph's dtype."""
    d_atol, d_rtol = DEFAULT_TOLERANCES[dtype]
    return (d_atol if atol is None else float(atol)), (d_rtol if rtol is None else float(rtol))


@dataclass(frozen=True)
class Case:
    """One validation input: a batch of token ids and its attention mask (numpy int64)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None = None  # encoders with segment embeddings

    def feed(self, names) -> dict[str, np.ndarray]:
        """The ONNX inputs among `names` this case provides."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return {k: v for k, v in out.items() if k in names}

    def describe(self) -> dict[str, int]:
        b, s = self.input_ids.shape
        return {"batch": int(b), "seq": int(s), "padded_rows": int((self.attention_mask == 0).any(axis=1).sum())}


def make_cases(vocab_size: int, max_len: int, padding_side: str = "left", seed: int = 0,
               token_types: bool = False) -> list[Case]:
    """Several batch sizes and sequence lengths, some rows padded on `padding_side`.

    `max_len` is the model's position limit; every case fits in it. `token_types`: the
    second half of each row's tokens is segment 1 (a sentence pair), padding segment 0.
    """
    rng = np.random.default_rng(seed)
    specs = [(1, 1), (1, 9), (2, 16), (3, 5), (4, 33)]
    cases = []
    for batch, seq in specs:
        seq = max(1, min(seq, max_len))
        ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        for row in range(1, batch):  # row 0 full; the others progressively shorter
            keep = max(1, seq - row * max(1, seq // (batch + 1)))
            if padding_side == "left":
                mask[row, : seq - keep] = 0
            else:
                mask[row, keep:] = 0
        types = None
        if token_types:
            types = np.zeros_like(ids)
            for row in range(batch):
                real = np.nonzero(mask[row])[0]
                types[row, real[len(real) // 2:]] = 1
        cases.append(Case(ids, mask, types))
    return cases


def diff_stats(out: np.ndarray, ref: np.ndarray, mask: np.ndarray, atol: float, rtol: float,
               norm: bool = False) -> dict[str, float]:
    """Differences over the token positions of `mask` (outputs are [batch, seq, ...]).

    `norm`: the pass ratio is `rel_rms / rtol` (`||onnx - ref|| / ||ref||` over the token
    positions), the criterion of int4 graphs, whose rounding makes element-wise bounds
    depend on the model's output scale.
    """
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return {"max_abs_diff": float("inf"), "max_rel_diff": float("inf"), "worst_ratio": float("inf"),
                "shape_mismatch": f"{list(out.shape)} vs {list(ref.shape)}"}
    sel = mask.astype(bool)
    o, r = out[sel], ref[sel]
    if not np.isfinite(o).all() or not np.isfinite(r).all():
        return {"max_abs_diff": float("inf"), "max_rel_diff": float("inf"), "worst_ratio": float("inf"),
                "non_finite": True}
    d = np.abs(o - r)
    big = np.abs(r) > atol
    rel = float((d[big] / np.abs(r[big])).max()) if big.any() else 0.0
    ref_norm = float(np.sqrt((r * r).sum()))
    rel_rms = float(np.sqrt((d * d).sum())) / ref_norm if ref_norm > 0 else float(d.max(initial=0.0))
    stats = {"max_abs_diff": float(d.max(initial=0.0)), "max_rel_diff": rel, "rel_rms": rel_rms,
             "worst_ratio": float((d / (atol + rtol * np.abs(r))).max(initial=0.0))}
    if o.ndim == 2 and o.shape[0]:  # [tokens, vocab or hidden]: how often the top entry agrees
        stats["top1_agreement"] = float((o.argmax(axis=-1) == r.argmax(axis=-1)).mean())
    if norm:  # int4: the error relative to the output's size, not element by element
        stats["worst_ratio"] = rel_rms / rtol if rtol > 0 else float("inf")
    return stats


def compare(name: str, cases: Sequence[Case], outputs: Sequence[np.ndarray],
            reference: Callable[[Case], np.ndarray] | Sequence[np.ndarray], atol: float, rtol: float,
            norm: bool = False) -> dict:
    """One comparison (ONNX outputs vs `reference(case)`, or the computed references in case
    order, for every case), with per-case details."""
    per_case = []
    for i, (case, out) in enumerate(zip(cases, outputs)):
        ref = reference(case) if callable(reference) else reference[i]
        stats = diff_stats(out, ref, case.attention_mask, atol, rtol, norm)
        per_case.append({**case.describe(), **stats})
    worst = max(per_case, key=lambda c: c["worst_ratio"])
    return {
        "name": name,
        "passed": all(c["worst_ratio"] <= 1.0 for c in per_case),
        "max_abs_diff": max(c["max_abs_diff"] for c in per_case),
        "max_rel_diff": max(c["max_rel_diff"] for c in per_case),
        "max_rel_rms": max(c.get("rel_rms", float("inf")) for c in per_case),
        "min_top1_agreement": min((c["top1_agreement"] for c in per_case if "top1_agreement" in c), default=None),
        "criterion": "rel_rms" if norm else "elementwise",
        "worst_ratio": worst["worst_ratio"],
        "worst_case": {k: worst[k] for k in ("batch", "seq", "padded_rows")},
        "cases": per_case,
    }


def failure_line(comparison: dict, provider: str, atol: float, rtol: float) -> str:
    """The one line a failed comparison is reported with."""
    w = comparison["worst_case"]
    if comparison.get("criterion") == "rel_rms":
        return (f"validation failed on {provider}: ONNX vs {comparison['name']} differs at batch {w['batch']}, "
                f"seq {w['seq']}: relative RMS error {comparison['max_rel_rms']:.3g} exceeds rtol {rtol:g} "
                f"(||onnx - ref|| / ||ref||, the int4 criterion); nothing was written")
    return (f"validation failed on {provider}: ONNX vs {comparison['name']} differs at batch {w['batch']}, "
            f"seq {w['seq']}: max abs diff {comparison['max_abs_diff']:.3g}, max rel diff "
            f"{comparison['max_rel_diff']:.3g} exceed atol {atol:g} + rtol {rtol:g}*|ref| "
            f"({comparison['worst_ratio']:.3g}x the tolerance); nothing was written")
