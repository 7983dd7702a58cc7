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

import torch

from exporters.generation_check import (
    compare_generation,
    generation_failure_line,
    generation_prompts,
)
from exporters.hf_model import OUTPUT_NAME, PADDING_SIDE, load_weights, max_positions
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

    `model` holds the merged weights (float32), or is a `DeferredModel` built after the
    ONNX Runtime session is closed (one of the two in memory at a time); `restore` maps every tensor the merge
    changed (and every untied alias) to its base value, for the unmerged reference. On
    return `model` holds the base weights. The report is JSON-able. `on_stage(name)` is told
    as each step starts (running the graph, each PyTorch reference, generation).
    """
    stage = on_stage or (lambda name: None)
    config = model.config
    task = spec.task
    out_name = OUTPUT_NAME[task]
    max_len = min(VALIDATION_MAX_LEN, max_positions(config))
    cases = make_cases(int(config.vocab_size), max_len, PADDING_SIDE[task],
                       token_types="token_type_ids" in spec.input_names)
    try:
        stage(f"validating: running the graph on {provider} ({len(cases)} shapes)")
        session = open_session(graph, provider)
        if spec.kv_cache:
            decoder = OrtDecoder(session)
            outputs = [decoder.step(c.input_ids, c.attention_mask, decoder.start(len(c.input_ids)))[0]
                       for c in cases]
        else:
            outputs = [session.run([out_name], c.feed(spec.input_names))[0] for c in cases]
    except Exception as exc:  # the graph does not load or run: that is a failed check too
        return {"passed": False, "provider": provider, "requested_provider": requested,
                "failure": _cannot_run(provider, exc)}
    used, chain = really_used(session)
    del session
    stage("validating: vs the merged PyTorch model")
    if isinstance(model, DeferredModel):  # built now: the session's memory is released
        model = model.build()
    wrapper = PlainWrapper(model, task).eval()

    def torch_run(case: Case):
        ids, mask = torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask)
        with torch.no_grad():
            if spec.kv_cache:  # the graph's position ids: cumsum(mask) - 1
                pos = torch.from_numpy(positions(case.attention_mask, ids.shape[1]))
                return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.numpy()
            types = None if case.token_type_ids is None else torch.from_numpy(case.token_type_ids)
            return wrapper(ids, mask, types).numpy()

    comparisons = {"merged_pytorch": compare("merged PyTorch model", cases, outputs, torch_run, atol, rtol,
                                                 norm=dtype == "int4")}
    # the same module, back to the base weights, with the adapters as unmerged branches
    stage("validating: vs the base with the adapters unmerged")
    load_weights(model, restore)
    with apply_unmerged(model, adapters, weights):
        comparisons["unmerged_pytorch"] = compare("base + unmerged adapters (PyTorch)", cases, outputs,
                                                  torch_run, atol, rtol, norm=dtype == "int4")
        if spec.kv_cache:  # a second session, opened after the first was released
            stage("validating: generation through the KV cache")
            try:
                decoder = OrtDecoder(open_session(graph, provider))
                comparisons["generation"] = compare_generation(
                    decoder, model, generation_prompts(int(config.vocab_size), max_len), atol, rtol,
                    norm=dtype == "int4")
            except Exception as exc:
                return {"passed": False, "provider": used, "requested_provider": requested,
                        "failure": _cannot_run(used, exc)}
            del decoder
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
