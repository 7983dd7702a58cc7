"""`adapters merge --to onnx`: fold adapters into a base model, export ONNX, prove it equal.

Contract of `export_merged_onnx`: the graph at `out_dir` is exactly the base model with
the adapters folded in, and (unless `validate=False`) it has been *run* on ONNX Runtime
and compared with two PyTorch references on several batch sizes and sequence lengths,
padding included:

1. the merged PyTorch model: proves the export;
2. the base model with the adapters applied *unmerged* (`mora_core.forward`): proves the
   merge itself.

Either comparison outside `atol + rtol*|ref|` raises `ValidationFailed` and leaves nothing at
`out_dir`: everything is built in a temporary folder beside it and renamed into place only
after validation passed (`exporters.outputs.staged_output`).

This module is the orchestration only: arguments, merge, temp folder, recipe, rename.
The graph itself is written by `exporters.onnx_graph.export_graph` and checked by
`exporters.onnx_validation.validate_graph`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from exporters.errors import ExportError, ValidationFailed
from exporters.fused_decoder import EXPORTER as FUSED_EXPORTER
from exporters.fused_decoder import fused_refusal, write_fused_decoder
from exporters.genai_config import GENAI_CONFIG_NAME, genai_config, special_ids
from exporters.hf_model import check_architecture, load_config, max_positions, task_of
from exporters.memory import forget_exported_graph, release_memory, shortfall
from exporters.model_build import BaseValues, DeferredModel, merged_model
from exporters.onnx_graph import (
    MAX_OPSET,
    MIN_OPSET,
    ONNX_DTYPES,
    GraphSpec,
    export_graph,
    kv_spec,
    plain_spec,
)
from exporters.onnx_layout import DATA_NAME, GRAPH_NAME, RECIPE_NAME
from exporters.onnx_validation import validate_graph
from exporters.onnx_weights import inline_weights
from exporters.outputs import (
    copy_side_files,
    fsync_file,
    refuse_existing,
    staged_output,
    write_json,
)
from exporters.providers import choose_provider
from exporters.quantize import quantize_int4
from exporters.validate import tolerances
from mora_core.adapter import Adapter
from mora_core.checkpoint import Checkpoint, open_checkpoint
from registry.copying import hash_file

ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
# graph dtype -> dtype of the model it is exported from (int4 is quantised from a float32 graph)
MODEL_DTYPES = {**ONNX_DTYPES, "int4": torch.float32}
# int4 weights are about a quarter of float32 ones once the float32 embeddings are counted
INT4_SHRINK = 4
# weights above this go to external data (protobuf refuses messages over 2 GB)
EXTERNAL_DATA_BYTES = 1 << 30
TORCH_EXPORTER = "torch.onnx.export(dynamo=True, optimize=True)"
# `graph_writer`: "auto" writes Llama/Mistral/Qwen2 KV-cache graphs with exporters.fused_decoder
# (fused ONNX Runtime ops, no trace) and everything else with the torch exporter; float16 graphs
# are traced under "auto": the fused float16 graph carries about twice the traced graph's
# rounding (28 layers: max abs 0.0057 vs 0.0029 against float32) and a 3B-class one failed
# validation by 1.25x the tolerance where the traced one passed (README, "Memory")
GRAPH_WRITERS = ("auto", "fused", "torch")

StageFn = Callable[[str], None]


def export_merged_onnx(
    base_dir: Path,
    adapters: list[Adapter],
    weights: list[float],
    out_dir: Path,
    *,
    dtype: str = "float32",
    opset: int | None = None,
    provider: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    validate: bool = True,
    kv_cache: bool | None = None,
    accumulate: str = "float32",
    on_stage: StageFn | None = None,
    external_data: bool | None = None,
    checkpoint: Checkpoint | None = None,
    finish: Callable[[Path, dict[str, Any]], dict[str, str]] | None = None,
    graph_writer: str = "auto",
) -> dict[str, Any]:
    """Merge `adapters` (with `weights`) into the model at `base_dir`, export and validate it.

    `kv_cache`: None (default) gives decoders the KV-cache signature (with
    `genai_config.json`) and encoders the plain one; False keeps the plain signature for
    decoders; True on an encoder is an `ExportError`.

    Returns a JSON-able summary: `output`, `files`, `opset`, `dtype`, `model_type`,
    `task`, `untied`, `export` (the export.json content), `validation` (None when
    `validate=False`), `seconds` (per stage). `external_data`: None decides by size
    (above 1 GiB of weights), True/False forces it. `finish(folder, summary)` adds
    files last, in the staged folder (the model card: `exporters.card.OutputCard`).
    `graph_writer`: "auto" (default) writes the KV-cache graph of Llama, Mistral and Qwen2
    with `exporters.fused_decoder` (fused ONNX Runtime ops: GroupQueryAttention with the
    padding mask as a bias, RotaryEmbedding, SkipSimplifiedLayerNormalization; written from
    the merged tensors by name, no trace) and every other graph with `torch.onnx.export`;
    float16 graphs are traced under "auto" (the fused float16 graph's rounding; see
    `GRAPH_WRITERS`); "torch" forces the torch exporter; "fused" requires the fused writer (an `ExportError`
    says why a model cannot have it). `on_stage(name)` is told as each long stage starts (building, exporting, quantising,
    validating step by step, writing): the CLI shows it with its elapsed time. Nothing here prints.

    Raises `ExportError`/`MergeError` (one line naming the input) for bad input and
    `ValidationFailed` when validation fails; in both cases nothing exists at `out_dir`.
    """
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(adapters)
    _check_arguments(adapters, weights, out_dir, dtype, accumulate, opset)
    atol_v, rtol_v = tolerances(dtype, atol, rtol)
    config = load_config(base_dir)  # first: a folder without config.json is named as such
    checkpoint = checkpoint if checkpoint is not None else open_checkpoint(base_dir)
    check_architecture(config, checkpoint.shapes, checkpoint.root / "config.json")  # before any allocation
    task = task_of(config)
    if kv_cache and task != "causal-lm":
        raise ExportError(f"{base_dir}: {config.model_type} is an encoder; a KV cache is for decoders")
    spec = kv_spec(config) if task == "causal-lm" and kv_cache is not False else plain_spec(task, config)
    if spec.kv_cache:
        special_ids(config, checkpoint.root)  # a malformed generation_config.json fails before the export
    fused = _use_fused(graph_writer, spec, config, base_dir, dtype)
    chosen = choose_provider(provider) if validate else None  # before the slow part

    seconds: dict[str, float] = {}
    quantization: dict[str, Any] | None = None
    stage = on_stage or (lambda name: None)
    stage(f"building the merged model ({config.model_type}, {dtype})")
    t = time.perf_counter()
    # the model exists once, in the dtype it is exported in, holding the merged tensors (model_build)
    built = merged_model(config, checkpoint, adapters, weights, dtype=MODEL_DTYPES[dtype],
                         accumulate=ACCUMULATE[accumulate])
    untied = built.untied
    total = sum(p.numel() * p.element_size() for p in built.model.parameters())
    graph_bytes = total // INT4_SHRINK if dtype == "int4" else total
    if validate:  # refused before the export, not killed for memory halfway through it
        reference_bytes = sum(p.numel() * 4 for p in built.model.parameters() if p.is_floating_point())
        problem = shortfall(graph_bytes, reference_bytes, dtype, chosen, released=total)  # the model goes first
        if problem:
            raise ValidationFailed(problem)
    seconds["merge"] = round(time.perf_counter() - t, 3)

    with staged_output(out_dir) as tmp:
        t = time.perf_counter()
        use_external = graph_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
        # saved with external data (streamed, one tensor at a time); the model is released
        # before a small graph's weights are moved inline (onnx_weights) or int4 is quantised
        first = tmp / ".float32" / GRAPH_NAME if dtype == "int4" else tmp / GRAPH_NAME
        first.parent.mkdir(exist_ok=True)
        graph_dtype = "float32" if dtype == "int4" else dtype
        if fused:
            stage("writing the fused ONNX graph with a KV cache (GroupQueryAttention, no trace)")
            real_opset = write_fused_decoder(built.model, spec, graph_dtype, opset, first)
        else:
            stage("exporting the ONNX graph" + (" with a KV cache" if spec.kv_cache else "") + " (torch.onnx, dynamo)")
            real_opset = export_graph(built.model, spec, graph_dtype, opset, first, True)
        built.model = None
        forget_exported_graph()  # torch.onnx's optimizer would keep the model alive
        release_memory()  # the model's freed tensors back to the system before the next stage
        if dtype == "int4":
            stage("quantising to int4 (MatMulNBits)")
            quantization = quantize_int4(first, tmp / GRAPH_NAME, use_external)
            shutil.rmtree(first.parent)
        elif not use_external:
            stage("writing the weights into model.onnx")
            inline_weights(tmp / GRAPH_NAME)
        seconds["export"] = round(time.perf_counter() - t, 3)

        validation = None
        if validate:
            t = time.perf_counter()
            # the float32 reference is built now (the export's model is gone) and released before
            # the session opens; the base value of each changed tensor is read back from the
            # base files when the unmerged pass needs it
            reference = DeferredModel(config, lambda: merged_model(
                config, checkpoint, adapters, weights, accumulate=ACCUMULATE[accumulate]).model)
            validation = validate_graph(tmp / GRAPH_NAME, spec, reference, BaseValues(built.layout, built.changed()),
                                        adapters, weights, chosen, provider, atol_v, rtol_v, dtype,
                                        on_stage=stage)
            seconds["validation"] = round(time.perf_counter() - t, 3)
            if not validation["passed"]:
                raise ValidationFailed(validation["failure"])

        stage("writing side files, export.json and the model card")
        digests = copy_side_files(checkpoint.root, tmp, {"tie_word_embeddings": False} if untied else None)
        if spec.kv_cache:
            digests[GENAI_CONFIG_NAME] = write_json(
                tmp / GENAI_CONFIG_NAME, genai_config(config, spec, GRAPH_NAME, checkpoint.root, max_positions(config),
                                                      share_buffer=fused))
        recipe = _recipe(tmp, config, spec, adapters, weights, dtype, accumulate, real_opset, untied,
                         built.layout.ignored, validation, quantization, FUSED_EXPORTER if fused else TORCH_EXPORTER)
        digests.update({name: f["sha256"] for name, f in recipe["files"].items()})
        digests[RECIPE_NAME] = write_json(tmp / RECIPE_NAME, recipe)
        if finish is not None:  # the model card (exporters.card), with the validation summary
            digests.update(finish(tmp, {"output": str(out_dir), "dtype": dtype, "opset": real_opset,
                                        "untied": untied, "validation": validation}))
    seconds["total"] = round(time.perf_counter() - started, 3)
    return {
        "output": str(out_dir),
        "files": recipe["files"],
        "digests": dict(sorted(digests.items())),  # every output file, taken while written
        "model_type": config.model_type,
        "task": task,
        "kv_cache": spec.kv_cache,
        "dtype": dtype,
        "opset": real_opset,
        "untied": untied,
        "export": recipe,
        "validation": validation,
        "seconds": seconds,
    }


def _check_arguments(adapters: Sequence[Adapter], weights: Sequence[float], out_dir: Path, dtype: str,
                     accumulate: str, opset: int | None) -> None:
    if dtype not in MODEL_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: ONNX export supports {', '.join(MODEL_DTYPES)}")
    if accumulate not in ACCUMULATE:
        raise ExportError(f"--accumulate {accumulate!r} is not one of {', '.join(ACCUMULATE)}")
    if len(weights) != len(adapters):
        raise ExportError(f"{len(adapters)} adapters but {len(weights)} weights")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {MAX_OPSET}")
    refuse_existing(out_dir)


def _use_fused(graph_writer: str, spec: GraphSpec, config, base_dir: Path, dtype: str) -> bool:
    """Whether the graph is written by `exporters.fused_decoder` (see `graph_writer`)."""
    if graph_writer not in GRAPH_WRITERS:
        raise ExportError(f"graph writer {graph_writer!r} is not one of {', '.join(GRAPH_WRITERS)}")
    if graph_writer == "torch":
        return False
    why = fused_refusal(config) if spec.kv_cache else "the graph has no KV cache"
    if graph_writer == "fused" and why is not None:
        raise ExportError(f"{base_dir}: the fused graph writer cannot write this model: {why}")
    return why is None and (graph_writer == "fused" or dtype != "float16")


def _recipe(folder: Path, config, spec: GraphSpec, adapters: Sequence[Adapter], weights: Sequence[float],
            dtype: str, accumulate: str, opset: int, untied: dict[str, str], ignored: list[str],
            validation: dict[str, Any] | None, quantization: dict[str, Any] | None = None,
            exporter: str = TORCH_EXPORTER) -> dict[str, Any]:
    """export.json: how this graph was made, enough to make it again and to check it."""
    from exporters.recipe import tool_versions

    files = {}
    for name in (GRAPH_NAME, DATA_NAME):
        p = folder / name
        if p.is_file():
            digest, size = hash_file(p)  # the graph's only read; then it is made durable
            fsync_file(p)
            files[name] = {"sha256": digest, "bytes": size}
    task = spec.task
    signature = spec.describe()
    io_dtype = "float32" if dtype == "int4" else dtype
    return {
        "format": "onnx",
        "files": files,
        "graph": GRAPH_NAME,
        "external_data": DATA_NAME if DATA_NAME in files else None,
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "task": task,
        "inputs": {n: {"dtype": "int64" if not n.startswith("past_") else io_dtype, "shape": shape}
                   for n, shape in signature["inputs"].items()},
        "outputs": {n: {"dtype": io_dtype, "shape": shape} for n, shape in signature["outputs"].items()},
        "kv_cache": spec.kv_cache,
        "genai_config": GENAI_CONFIG_NAME if spec.kv_cache else None,
        "dtype": dtype,
        "quantization": quantization,
        "opset": opset,
        "exporter": exporter,
        "accumulate": accumulate,
        "adapters": [{"label": a.label, "kind": a.kind, "weight": w,
                      "path": str(a.path) if a.path is not None else None} for a, w in zip(adapters, weights)],
        "untied": untied,
        "ignored_base_tensors": ignored,
        "tools": tool_versions(),
        "validation": None if validation is None else {
            k: validation[k] for k in ("provider", "requested_provider", "passed", "max_abs_diff",
                                       "max_rel_diff", "atol", "rtol")},
    }
