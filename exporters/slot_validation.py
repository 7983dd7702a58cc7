"""Validation of slot graphs and adapter files: ONNX Runtime vs PyTorch with the adapters *unmerged*.

- slots graph: no adapter active vs the base model; then each adapter, activated the way
  a server does it (its `.onnx_adapter` file, `LoraAdapter` + `RunOptions`), vs the base
  with that adapter applied unmerged (`mora_core.forward.apply_unmerged`);
- mixed graph: every case is run with several row assignments (each adapter and the base
  in every row position); each row is compared with the unmerged reference of its adapter;
- an adapter file (`adapters pack`): that file active vs the unmerged reference at its weight.

KV-cache slot graphs (decoders' default) run the shape cases as prefills (empty past,
position ids `cumsum(mask) - 1`), and each adapter file (and no adapter) is also checked
while generating: prefill plus greedy decode steps through the graph's own cache with
the file active, against the base with that adapter unmerged and PyTorch's cache
(`exporters.generation_check`). A mixed KV graph is checked row by row on prefills, and
generates too: `adapter_index` fed at every step, rows with different adapters (and base
rows) in one left-padded batch, each row against the base with *its* adapter unmerged
(`RowsReference`: the rows of one adapter on their own PyTorch cache).

Cases, criterion and statistics are those of merged exports (`exporters.validate`). Like
`validate_graph`, these functions never raise for a wrong graph: the report's `passed` is
False and `failure` is the line to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.generation_check import (
    compare_generation,
    generation_failure_line,
    generation_prompts,
)
from exporters.hf_model import OUTPUT_NAME, PADDING_SIDE, max_positions
from exporters.onnx_graph import GraphSpec
from exporters.onnx_validation import CRITERION, VALIDATION_MAX_LEN, _cannot_run, torch_runner
from exporters.ort_adapter import Activation
from exporters.ort_decoder import OrtDecoder
from exporters.providers import open_session, really_used
from exporters.slot_graph import ADAPTER_INDEX, mixed_rows
from exporters.validate import Case, compare, failure_line, make_cases
from mora_core.adapter import Adapter
from mora_core.forward import apply_unmerged


def _cases(model: torch.nn.Module, task: str) -> list[Case]:
    config = model.config
    return make_cases(int(config.vocab_size), min(VALIDATION_MAX_LEN, max_positions(config)), PADDING_SIDE[task])


def _run_cases(session, spec: GraphSpec, cases: Sequence[Case], run_options=None,
               extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The graph's output for every case: a plain run, or a prefill through an empty cache."""
    if spec.kv_cache:
        outs = []
        for c in cases:
            decoder = OrtDecoder(session, run_options=run_options, extra_feed=extra)
            outs.append(decoder.step(c.input_ids, c.attention_mask, decoder.start(len(c.input_ids)))[0])
        return outs
    feed = dict(extra or {})
    return [session.run([OUTPUT_NAME[spec.task]], {"input_ids": c.input_ids, "attention_mask": c.attention_mask,
                                                   **feed}, run_options)[0] for c in cases]


def _report(comparisons: dict[str, dict], used: str, chain: Sequence[str], requested: str, atol: float,
            rtol: float, dtype: str) -> dict[str, Any]:
    report: dict[str, Any] = {
        "provider": used, "requested_provider": requested, "session_providers": list(chain),
        "passed": all(c["passed"] for c in comparisons.values()),
        "max_abs_diff": max(c["max_abs_diff"] for c in comparisons.values()),
        "max_rel_diff": max(c["max_rel_diff"] for c in comparisons.values()),
        "atol": atol, "rtol": rtol, "graph_dtype": dtype, "reference_dtype": "float32",
        "criterion": CRITERION, "comparisons": comparisons,
    }
    if not report["passed"]:
        failed = next(c for c in comparisons.values() if not c["passed"])
        line = generation_failure_line if "steps" in failed else failure_line
        report["failure"] = line(failed, used, atol, rtol)
    return report


def validate_adapter_files(graph: Path, model: torch.nn.Module, spec: GraphSpec,
                           files: Sequence[tuple[str, Path | None]],
                           adapters: Sequence[Adapter | None], weights: Sequence[float], provider: str,
                           requested: str, atol: float, rtol: float, dtype: str) -> dict[str, Any]:
    """Run the slots graph once per entry of `files` ((name, adapter file or None)) on one session.

    Entry i is compared with the base `model` (float32, base weights) plus `adapters[i]`
    unmerged at `weights[i]` (None: the base alone). KV graphs also generate with each
    entry active (comparison `"<name>: generation"`), on a second session.
    """
    task = spec.task
    cases = _cases(model, task)
    try:
        session = open_session(graph, provider)
        outputs = []
        for _, path in files:
            act = Activation(path)
            outputs.append(_run_cases(session, spec, cases, act.options))
    except Exception as exc:
        return {"passed": False, "provider": provider, "requested_provider": requested,
                "failure": _cannot_run(provider, exc)}
    used, chain = really_used(session)
    del session
    run = torch_runner(model, spec)
    comparisons: dict[str, dict] = {}
    prompts = generation_prompts(int(model.config.vocab_size), min(VALIDATION_MAX_LEN, max_positions(model.config)))
    for (name, path), adapter, weight, outs in zip(files, adapters, weights, outputs):
        with apply_unmerged(model, [adapter] if adapter is not None else [], [weight] if adapter is not None else []):
            what = "PyTorch base model" if adapter is None else "PyTorch base + unmerged adapter"
            comparisons[name] = compare(f"{name} ({what})", cases, outs, run, atol, rtol)
            if spec.kv_cache:
                try:
                    act = Activation(path)
                    decoder = OrtDecoder(open_session(graph, provider), run_options=act.options)
                    gen = compare_generation(decoder, model, prompts, atol, rtol)
                except Exception as exc:
                    return {"passed": False, "provider": used, "requested_provider": requested,
                            "failure": _cannot_run(used, exc)}
                del decoder
                comparisons[f"{name}: generation"] = {**gen, "name": f"{name}: {gen['name']}"}
    return _report(comparisons, used, chain, requested, atol, rtol, dtype)


def validate_mixed(graph: Path, model: torch.nn.Module, spec: GraphSpec, adapters: Sequence[Adapter],
                   provider: str, requested: str, atol: float, rtol: float, dtype: str) -> dict[str, Any]:
    """Row by row: every case with n+1 row assignments, each row against its adapter's unmerged reference."""
    n = len(adapters)
    cases = _cases(model, spec.task)
    runs = [(c, mixed_rows(n, len(c.input_ids), shift)) for c in cases for shift in range(n + 1)]
    try:
        session = open_session(graph, provider)
        outputs = [_run_cases(session, spec, [c], extra={ADAPTER_INDEX: rows})[0] for c, rows in runs]
    except Exception as exc:
        return {"passed": False, "provider": provider, "requested_provider": requested,
                "failure": _cannot_run(provider, exc)}
    used, chain = really_used(session)
    del session
    run = torch_runner(model, spec)
    per_adapter: dict[int, list[np.ndarray]] = {-1: [run(c) for c in cases]}
    for j, adapter in enumerate(adapters):
        with apply_unmerged(model, [adapter], [1.0]):
            per_adapter[j] = [run(c) for c in cases]
    refs = []
    for k, (_, rows) in enumerate(runs):
        case_refs = {j: per_adapter[j][k // (n + 1)] for j in range(-1, n)}
        refs.append(np.stack([case_refs[int(j)][i] for i, j in enumerate(rows)]))
    it = iter(refs)
    comparison = compare("per-row unmerged references (PyTorch)", [c for c, _ in runs], outputs,
                         lambda _case: next(it), atol, rtol)
    comparisons = {"mixed_rows": comparison}
    if spec.kv_cache:
        try:
            comparisons.update(_mixed_generation(graph, model, adapters, provider, atol, rtol))
        except Exception as exc:
            return {"passed": False, "provider": used, "requested_provider": requested,
                    "failure": _cannot_run(used, exc)}
    return _report(comparisons, used, chain, requested, atol, rtol, dtype)


class RowsReference(torch.nn.Module):
    """The reference of a mixed graph while generating, called as `compare_generation` calls a
    model: row i runs through `model` with `adapters[rows[i]]` unmerged (-1: the base alone).

    The rows of one adapter form a sub-batch with its own PyTorch cache, held here: the
    cache passed in is left empty (one instance per prompt). Logits come back in row order.
    """

    def __init__(self, model: torch.nn.Module, adapters: Sequence[Adapter], rows: np.ndarray):
        super().__init__()
        from transformers import DynamicCache

        self.model, self.adapters = model, list(adapters)
        self.groups = {int(j): np.nonzero(rows == j)[0] for j in np.unique(rows)}
        self.caches = {j: DynamicCache() for j in self.groups}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **_ignored: Any) -> Any:
        from types import SimpleNamespace

        logits: torch.Tensor | None = None
        for j, index in self.groups.items():
            rows = torch.from_numpy(index)
            ads = [self.adapters[j]] if j >= 0 else []
            with apply_unmerged(self.model, ads, [1.0] * len(ads)):
                out = self.model(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                 position_ids=position_ids[rows], past_key_values=self.caches[j], use_cache=True,
                                 return_dict=True).logits
            if logits is None:
                logits = out.new_zeros((input_ids.shape[0], *out.shape[1:]))
            logits[rows] = out
        return SimpleNamespace(logits=logits)


def generation_rows(n_adapters: int, batch: int) -> list[np.ndarray]:
    """Row assignments a mixed graph generates with: batch 1, the first adapter; wider batches,
    `mixed_rows` shifted by `batch` at a time until every adapter and the base had a row."""
    if batch == 1:
        return [mixed_rows(n_adapters, 1, 1)]
    return [mixed_rows(n_adapters, batch, shift) for shift in range(0, n_adapters + 1, batch)]


def _mixed_generation(graph: Path, model: torch.nn.Module, adapters: Sequence[Adapter], provider: str,
                      atol: float, rtol: float) -> dict[str, dict]:
    """Prefill + greedy decode through the mixed graph's cache for each prompt and row assignment."""
    prompts = generation_prompts(int(model.config.vocab_size), min(VALIDATION_MAX_LEN, max_positions(model.config)))
    session = open_session(graph, provider)
    out: dict[str, dict] = {}
    for ids, mask in prompts:
        for rows in generation_rows(len(adapters), len(ids)):
            decoder = OrtDecoder(session, extra_feed={ADAPTER_INDEX: rows})
            gen = compare_generation(decoder, RowsReference(model, adapters, rows), [(ids, mask)], atol, rtol)
            name = f"rows {rows.tolist()}"
            out[f"{name}: generation"] = {**gen, "name": f"{name}: {gen['name']}", "rows": rows.tolist()}
    return out
