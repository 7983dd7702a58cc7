"""Validation of an exported graph: run it on ONNX Runtime, compare with two PyTorch references.

1. the merged PyTorch model: proves the export;
2. the *base* model with the adapters applied unmerged (`mora_core.forward.apply_unmerged`):
   proves the merge itself;
3. for KV-cache graphs, generation: prefill plus greedy decode steps through the graph's
   own cache against the unmerged reference with PyTorch's cache
   (`exporters.generation_check`).

The shape cases of 1 and 2 run a KV graph with an empty past (prefill) and position ids
`cumsum(mask) - 1`, which the PyTorch references get too.

`validate_graph` never raises for a graph that is wrong or cannot run: it returns a
report whose `passed` is False and whose `failure` is the one line to show; the caller
decides what a failed check means (the exporter refuses to write anything).
Numerics (cases, criterion, per-case statistics) live in `exporters.validate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.generation_check import (
    RecordedGeneration,
    compare_recorded,
    generation_failure_line,
    generation_prompts,
    record_generation,
)
from exporters.hf_model import OUTPUT_NAME, PADDING_SIDE, load_weights, max_positions
from exporters.memory import release_memory
from exporters.model_build import DeferredModel
from exporters.onnx_graph import GraphSpec, PlainWrapper
from exporters.ort_decoder import OrtDecoder, positions
from exporters.providers import open_session, really_used
from exporters.validate import Case, compare, failure_line, make_cases
from mora_core.adapter import Adapter
from mora_core.forward import apply_unmerged

VALIDATION_MAX_LEN = 64
CRITERION = "|onnx - ref| <= atol + rtol*|ref| on token positions (attention_mask == 1)"


def _cannot_run(provider: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return (f"validation failed on {provider}: ONNX Runtime cannot run the exported graph "
            f"({type(exc).__name__}: {first}); nothing was written")


def validate_graph(graph: Path, spec: GraphSpec, model: torch.nn.Module | DeferredModel,
                   restore: Mapping[str, torch.Tensor], adapters: Sequence[Adapter], weights: Sequence[float],
                   provider: str,
                   requested: str, atol: float, rtol: float, dtype: str,
                   on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the graph on `provider` and compare it with the merged and the unmerged PyTorch model.

    `model` holds the merged weights (float32), or is a `DeferredModel` built here and
    released before ONNX Runtime loads the graph; `restore` maps every tensor the merge
    changed (and every untied alias) to its base value, for the unmerged reference. The
    PyTorch side runs first and its outputs are kept (the shape cases' logits and the
    generation's steps: a few MB to a few hundred MB, against GB of weights), then one
    ONNX Runtime session runs every case: the reference and the session are never in
    memory together, and the peak is the larger of the two. A `model` passed as a module
    holds the base weights on return. The report is JSON-able. `on_stage(name)` is told
    as each step starts (each PyTorch reference, running the graph, generation).
    """
    stage = on_stage or (lambda name: None)
    config = model.config
    task = spec.task
    out_name = OUTPUT_NAME[task]
    max_len = min(VALIDATION_MAX_LEN, max_positions(config))
    cases = make_cases(int(config.vocab_size), max_len, PADDING_SIDE[task],
                       token_types="token_type_ids" in spec.input_names)
    prompts = generation_prompts(int(config.vocab_size), max_len) if spec.kv_cache else []
    norm = dtype == "int4"
    refs, recorded = _reference_outputs(model, spec, cases, restore, adapters, weights, prompts, stage)
    release_memory()  # the reference's weights go back to the system before the session maps the graph

    comparisons: dict[str, dict[str, Any]] = {}
    try:
        stage(f"validating: running the graph on {provider} ({len(cases)} shapes"
              + (", then generation through the KV cache)" if spec.kv_cache else ")"))
        session = open_session(graph, provider, low_memory=True)
        if spec.kv_cache:
            decoder = OrtDecoder(session)
            outputs = [decoder.step(c.input_ids, c.attention_mask, decoder.start(len(c.input_ids)))[0]
                       for c in cases]
        else:
            outputs = [session.run([out_name], c.feed(spec.input_names))[0] for c in cases]
        for key, name in (("merged_pytorch", "merged PyTorch model"),
                          ("unmerged_pytorch", "base + unmerged adapters (PyTorch)")):
            comparisons[key] = compare(name, cases, outputs, refs[key], atol, rtol, norm=norm)
        del outputs
        if spec.kv_cache:
            comparisons["generation"] = compare_recorded(decoder, recorded, atol, rtol, norm=norm)
            del decoder
    except Exception as exc:  # the graph does not load or run: that is a failed check too
        return {"passed": False, "provider": provider, "requested_provider": requested,
                "failure": _cannot_run(provider, exc)}
    used, chain = really_used(session)
    del session
    release_memory()
    report: dict[str, Any] = {
        "provider": used,
        "requested_provider": requested,
        "session_providers": list(chain),
        "passed": all(c["passed"] for c in comparisons.values()),
        "max_abs_diff": max(c["max_abs_diff"] for c in comparisons.values()),
        "max_rel_diff": max(c["max_rel_diff"] for c in comparisons.values()),
        "atol": atol,
        "rtol": rtol,
        "graph_dtype": dtype,
        "reference_dtype": "float32",
        "criterion": CRITERION,
        "comparisons": comparisons,
    }
    if not report["passed"]:
        key, failed = next((k, c) for k, c in comparisons.items() if not c["passed"])
        line = generation_failure_line if key == "generation" else failure_line
        report["failure"] = line(failed, used, atol, rtol)
    return report


def torch_runner(model: torch.nn.Module, spec: GraphSpec) -> Callable[[Case], np.ndarray]:
    """`case -> logits or hidden states` of a PyTorch model fed as the graph of `spec` is fed
    (KV graphs: position ids `cumsum(mask) - 1`, no cache; encoders: token types when given)."""
    wrapper = PlainWrapper(model, spec.task).eval()

    def run(case: Case) -> np.ndarray:
        ids, mask = torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask)
        with torch.no_grad():
            if spec.kv_cache:  # the graph's position ids: cumsum(mask) - 1
                pos = torch.from_numpy(positions(case.attention_mask, ids.shape[1]))
                return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.numpy()
            types = None if case.token_type_ids is None else torch.from_numpy(case.token_type_ids)
            return wrapper(ids, mask, types).numpy()

    return run


def _reference_outputs(model: torch.nn.Module | DeferredModel, spec: GraphSpec, cases: Sequence[Case],
                       restore: Mapping[str, torch.Tensor], adapters: Sequence[Adapter], weights: Sequence[float],
                       prompts: Sequence[tuple[np.ndarray, np.ndarray]],
                       stage: Callable[[str], None]) -> tuple[dict[str, list[np.ndarray]], list[RecordedGeneration]]:
    """The PyTorch side of every comparison, computed before any ONNX Runtime session exists.

    Merged model on the shape cases, then the same module back on the base weights with
    the adapters as unmerged branches on the shape cases and (KV graphs) the recorded
    greedy generation of `prompts`. A `DeferredModel` is built here and released on return.
    """
    stage("validating: vs the merged PyTorch model")
    if isinstance(model, DeferredModel):  # built now, dropped when this function returns
        model = model.build()
    torch_run = torch_runner(model, spec)
    refs = {"merged_pytorch": [torch_run(c) for c in cases]}
    # the same module, back to the base weights, with the adapters as unmerged branches
    stage("validating: vs the base with the adapters unmerged")
    load_weights(model, restore)
    recorded: list[RecordedGeneration] = []
    with apply_unmerged(model, adapters, weights):
        refs["unmerged_pytorch"] = [torch_run(c) for c in cases]
        if prompts:
            stage("validating: generation through the KV cache (PyTorch reference)")
            recorded = record_generation(model, prompts)
    return refs, recorded
