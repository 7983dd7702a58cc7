"""`adapters export --slots`: the base model exported once, with adapter slots; and `adapters pack`.

Contract of `export_slots_onnx`: the graph at `out_dir` computes the *base* model with a
branch on every module that a given adapter targets (see `exporters.slot_layout`), has
the same model inputs as a merged export (plus `adapter_index` for `mixed`), and has been
run on ONNX Runtime: with no adapter active against the base model, and with each given
adapter active (through its `.onnx_adapter` file) against the base with that adapter
applied unmerged; a mixed graph row by row. Outside tolerance: `ValidationFailed`, and
nothing exists at `out_dir` (built in a temp folder beside it, renamed when valid).

Contract of `pack_adapter`: the `.onnx_adapter` file of one adapter at one weight for a
slots graph (LoRA: A and B*scaling*weight; MoRA: M*weight), validated on that graph
against the unmerged reference before it appears at `out_file`. An adapter that does not
fit the graph's slots is an `ExportError` naming the module.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from exporters.errors import ExportError, ValidationFailed
from exporters.export_folder import present, read_json_object
from exporters.genai_config import GENAI_CONFIG_NAME, genai_config, special_ids
from exporters.hf_model import load_config, max_positions, task_of
from exporters.model_build import merged_model
from exporters.onnx_export import EXTERNAL_DATA_BYTES
from exporters.onnx_graph import (
    MAX_OPSET,
    MIN_OPSET,
    ONNX_DTYPES,
    GraphSpec,
    KVCacheWrapper,
    _kv_example,
    _plain_example,
    export_module,
    kv_spec,
    plain_spec,
)
from exporters.onnx_layout import DATA_NAME, FORMAT_SLOTS, GRAPH_NAME, RECIPE_NAME
from exporters.ort_adapter import ADAPTER_SUFFIX, write_adapter_file
from exporters.outputs import (
    copy_side_files,
    fsync_file,
    refuse_existing,
    staged_output,
    write_json,
)
from exporters.providers import choose_provider
from exporters.slot_graph import (
    ADAPTER_INDEX,
    Feeds,
    KVMixedWrapper,
    KVSlotsWrapper,
    MixedWrapper,
    SlotsWrapper,
    attach,
    build_stacks,
    slot_defaults,
    slot_example,
)
from exporters.slot_layout import BoundBranch, SlotLayout, bind, fit, parameters, slots_of
from exporters.slot_validation import validate_adapter_files, validate_mixed
from exporters.validate import tolerances
from mora_core.adapter import Adapter
from mora_core.checkpoint import open_checkpoint
from registry.blobs import hash_file

StageFn = Callable[[str], None]


class BaseModel:
    """The base model of a folder, built from config.json with its own weights (float32, eval)."""

    def __init__(self, base_dir: Path):
        self.dir = Path(base_dir)
        self.config = load_config(self.dir)
        self.task = task_of(self.config)
        self.checkpoint = open_checkpoint(self.dir)
        built = merged_model(self.config, self.checkpoint, [], [])  # meta build, base weights in place
        self.model = built.model
        self.ignored = built.layout.ignored
        self.shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}

    def file_digests(self) -> dict[str, str]:
        return {p.name: hash_file(p)[0] for p in self.checkpoint.paths}


def _check(adapters: Sequence[Adapter], out: Path, dtype: str, opset: int | None) -> None:
    if not adapters:
        raise ExportError("--slots: no adapters given")
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: ONNX export supports {', '.join(ONNX_DTYPES)}")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {MAX_OPSET}")
    refuse_existing(out)


def export_slots_onnx(base_dir: Path, adapters: list[Adapter], out_dir: Path, *, mixed: bool = False,
                      dtype: str = "float32", opset: int | None = None, provider: str = "auto",
                      atol: float | None = None, rtol: float | None = None, kv_cache: bool | None = None,
                      on_stage: StageFn | None = None, external_data: bool | None = None,
                      hub: dict[str, str] | None = None) -> dict[str, Any]:
    """Export the base at `base_dir` with slots for `adapters` (or, `mixed`, with them stacked inside).

    `hub` ({"repo", "commit"}): the base came from the Hugging Face Hub; export.json records it.

    `kv_cache` as in `export_merged_onnx`: None gives decoders the KV-cache signature
    (and a slots graph `genai_config.json`), False the plain one, True on an encoder is
    an `ExportError`. A KV slots graph is validated by generating too: prefill plus greedy
    decode steps through its cache with each adapter file active, against the base with
    that adapter unmerged (PyTorch's cache).

    Returns a JSON-able summary (`output`, `files`, `slots`, `parameters`, `validation`,
    `export` = export.json, `seconds`). `on_stage(name)` is called as each long stage starts
    (the CLI shows it with its elapsed time). Raises `ExportError`/`MoraCoreError` for bad input,
    `ValidationFailed` when a comparison fails; in both cases nothing exists at `out_dir`.
    """
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check(adapters, out_dir, dtype, opset)
    atol_v, rtol_v = tolerances(dtype, atol, rtol)
    stage = on_stage or (lambda name: None)
    stage("building the base model")
    base = BaseModel(base_dir)
    spec = slot_spec(base.config, base.task, kv_cache)
    if spec.kv_cache and not mixed:
        special_ids(base.config, base.checkpoint.root)  # a malformed generation_config.json fails first
    chosen = choose_provider(provider)
    branches = [bind(a, base.shapes) for a in adapters]
    for a, bs in zip(adapters, branches):
        if not bs:
            raise ExportError(f"{a.label}: targets no module of the base model")
    layout = slots_of(branches)
    seconds: dict[str, float] = {}
    stage("exporting the slots graph" if not mixed else "exporting the mixed-adapters graph")

    with staged_output(out_dir) as tmp:
        t = time.perf_counter()
        total = sum(p.numel() * p.element_size() for p in base.model.parameters())
        n_bytes = total // (2 if dtype == "float16" else 1)
        external = n_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
        real_opset = _export(base, layout, branches if mixed else None, spec, dtype, opset, tmp / GRAPH_NAME,
                             external)
        seconds["export"] = round(time.perf_counter() - t, 3)
        stage(f"validating on {chosen} ({len(adapters) + (0 if mixed else 1)} adapter cases)")

        t = time.perf_counter()
        if mixed:
            validation = validate_mixed(tmp / GRAPH_NAME, base.model, spec, adapters, chosen, provider,
                                        atol_v, rtol_v, dtype)
        else:
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{out_dir.name}.adapters-") as work:
                files: list[tuple[str, Path | None]] = [("no adapter", None)]
                for i, (a, bs) in enumerate(zip(adapters, branches)):
                    path = Path(work) / f"{i}{ADAPTER_SUFFIX}"
                    write_adapter_file(path, parameters(fit(a.label, bs, layout, str(out_dir)), 1.0, dtype))
                    files.append((a.label if a.label not in dict(files) else f"{a.label} #{i + 1}", path))
                validation = validate_adapter_files(tmp / GRAPH_NAME, base.model, spec, files,
                                                    [None, *adapters], [1.0] * len(files), chosen, provider,
                                                    atol_v, rtol_v, dtype)
        seconds["validation"] = round(time.perf_counter() - t, 3)
        if not validation["passed"]:
            raise ValidationFailed(validation["failure"])

        stage("writing side files and export.json")
        for name in (GRAPH_NAME, DATA_NAME):
            if (tmp / name).is_file():
                fsync_file(tmp / name)
        copy_side_files(base.checkpoint.root, tmp)
        if spec.kv_cache and not mixed:  # genai feeds model inputs only: a mixed graph's adapter_index it cannot
            write_json(tmp / GENAI_CONFIG_NAME, genai_config(base.config, spec, GRAPH_NAME, base.checkpoint.root,
                                                             max_positions(base.config)))
        recipe = _recipe(tmp, base, layout, adapters, mixed, spec, dtype, real_opset, validation, hub)
        write_json(tmp / RECIPE_NAME, recipe)
    seconds["total"] = round(time.perf_counter() - started, 3)
    return {"output": str(out_dir), "files": recipe["files"], "model_type": base.config.model_type,
            "task": base.task, "kv_cache": spec.kv_cache, "dtype": dtype, "opset": real_opset, "mixed": mixed,
            "slots": recipe["slots"],
            "parameters": recipe["parameters"], "export": recipe, "validation": validation, "seconds": seconds}


def slot_spec(config, task: str, kv_cache: bool | None) -> GraphSpec:
    """The model inputs/outputs of a slots graph: those of a merged export of the same base."""
    if kv_cache and task != "causal-lm":
        raise ExportError(f"{config.model_type} is an encoder; a KV cache is for decoders")
    return kv_spec(config) if task == "causal-lm" and kv_cache is not False else plain_spec(task)


def _export(base: BaseModel, layout: SlotLayout, stacked: list[list[BoundBranch]] | None, spec: GraphSpec,
            dtype: str, opset: int | None, path: Path, external: bool) -> int:
    """Hook the branches on (a copy in `dtype` of) the base model, export, give slot inputs defaults."""
    tdtype = ONNX_DTYPES[dtype]
    model = base.model if dtype == "float32" else copy.deepcopy(base.model).to(tdtype)
    feeds = Feeds()
    if spec.kv_cache:
        inner: torch.nn.Module = KVCacheWrapper(model)
        example, dynamic = _kv_example(model, spec, tdtype)
    else:
        inner = _inner(model, spec.task)
        example, dynamic = _plain_example(base.model)
    if stacked is None:
        slot_ex, slot_dyn = slot_example(layout, tdtype)
        names = [n for s in layout.slots for n in s.names]
        wrapper: torch.nn.Module = (KVSlotsWrapper if spec.kv_cache else SlotsWrapper)(inner, feeds, names)
        example, dynamic = (*example, slot_ex), {**dynamic, "slots": slot_dyn}
    else:
        stacks = build_stacks(layout, stacked)
        wrapper = (KVMixedWrapper if spec.kv_cache else MixedWrapper)(inner, feeds, stacks).to(tdtype)
        names = [ADAPTER_INDEX]
        example = (*example, torch.zeros(example[0].shape[0], dtype=torch.long))
        dynamic = {**dynamic, ADAPTER_INDEX: {0: dynamic["input_ids"][0]}}
    handles = attach(model, layout, feeds, mixed=stacked is not None)
    try:
        real_opset = export_module(wrapper.eval(), example, dynamic, [*spec.input_names, *names],
                                   spec.output_names, opset, path, external, base.config.model_type)
    finally:
        for h in handles:
            h.remove()
    if stacked is None:
        _add_defaults(path, slot_defaults(layout))
    return real_opset


def _inner(model: torch.nn.Module, task: str) -> torch.nn.Module:
    from exporters.onnx_graph import PlainWrapper

    return PlainWrapper(model, task)


def _add_defaults(path: Path, defaults: dict[str, tuple[int, ...]]) -> None:
    """Give every slot input a zero initializer of the same name: an overridable initializer."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: i for i in graph_model.graph.input}
    missing = sorted(set(defaults) - set(inputs))
    if missing:
        raise ExportError(f"the exported graph has no input {missing[0]} (exporter renamed a slot input)")
    for name, shape in defaults.items():
        np_dtype = helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type)
        graph_model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype=np_dtype), name))
    onnx.save_model(graph_model, str(path))
    onnx.checker.check_model(str(path))


def _recipe(folder: Path, base: BaseModel, layout: SlotLayout, adapters: Sequence[Adapter], mixed: bool,
            spec: GraphSpec, dtype: str, opset: int, validation: dict[str, Any],
            hub: dict[str, str] | None = None) -> dict[str, Any]:
    """export.json of a slot graph: what `adapters pack` and a server need to know about it."""
    from exporters.recipe import tool_versions

    files = {}
    for name in (GRAPH_NAME, DATA_NAME):
        p = folder / name
        if p.is_file():
            files[name] = {"sha256": hash_file(p)[0], "bytes": p.stat().st_size}
    task = base.task
    signature = spec.describe()
    inputs: dict[str, Any] = {n: {"dtype": "int64" if not n.startswith("past_") else dtype, "shape": shape}
                              for n, shape in signature["inputs"].items()}
    if mixed:
        inputs[ADAPTER_INDEX] = {"dtype": "int64", "shape": ["batch"],
                                 "values": "position in adapters (0-based), -1 = base model"}
    params = {} if mixed else {n: {"dtype": dtype, "shape": _param_shape(s, n)} for s in layout.slots for n in s.names}
    return {
        "format": FORMAT_SLOTS,
        "mixed": mixed,
        "files": files,
        "graph": GRAPH_NAME,
        "external_data": DATA_NAME if DATA_NAME in files else None,
        "model_type": base.config.model_type,
        "architectures": list(getattr(base.config, "architectures", None) or []),
        "task": task,
        "inputs": inputs,
        "outputs": {n: {"dtype": dtype, "shape": shape} for n, shape in signature["outputs"].items()},
        "kv_cache": spec.kv_cache,
        "genai_config": GENAI_CONFIG_NAME if spec.kv_cache and not mixed else None,
        "dtype": dtype,
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True, optimize=True) + adapter slots (exporters.slot_graph)",
        "base": {"path": str(base.dir.resolve()), "files": base.file_digests(), **({"hub": hub} if hub else {})},
        "slots": layout.to_list(),
        "parameters": params,
        "adapters": [{"position": i, "label": a.label, "kind": a.kind,
                      "path": str(a.path) if a.path is not None else None} for i, a in enumerate(adapters)],
        "ignored_base_tensors": base.ignored,
        "tools": tool_versions(),
        "validation": {k: validation[k] for k in ("provider", "requested_provider", "passed", "max_abs_diff",
                                                  "max_rel_diff", "atol", "rtol")},
    }


def _param_shape(slot, name: str) -> list:
    if slot.kind == "mora":
        return [slot.r_hat, slot.r_hat]
    return ["rank", slot.in_features] if name.endswith("lora_A") else [slot.out_features, "rank"]


# ----------------------------------------------------------------------------- pack

def read_slots_recipe(graph_dir: Path) -> dict[str, Any]:
    """export.json of a slots graph folder; `ExportError` when it is not one (or is a mixed graph)."""
    graph_dir = Path(graph_dir)
    if not present(graph_dir, RECIPE_NAME):
        raise ExportError(f"--graph {graph_dir}: no {RECIPE_NAME} (not an exported graph folder)")
    # the folder rule and the strict JSON reader, as for every other file of an export folder
    recipe = read_json_object(graph_dir, RECIPE_NAME, "export recipe")
    if recipe is None or recipe.get("format") != FORMAT_SLOTS:
        raise ExportError(f"--graph {graph_dir}: not a slots graph (export it with adapters export --slots)")
    if recipe.get("mixed"):
        raise ExportError(f"--graph {graph_dir}: a mixed graph holds its adapters inside; it has no slots to fill")
    if not (graph_dir / GRAPH_NAME).is_file():
        raise ExportError(f"--graph {graph_dir}: {GRAPH_NAME} is missing")
    return recipe


def pack_adapter(adapter: Adapter, graph_dir: Path, out_file: Path, *, weight: float = 1.0,
                 base_dir: Path | None = None, provider: str = "auto", atol: float | None = None,
                 rtol: float | None = None, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the `.onnx_adapter` file of `adapter` at `weight` for the slots graph at `graph_dir`.

    The base model is the one recorded in the graph's export.json (or `base_dir`). Returns
    a summary with the parameters written and the validation report. `on_stage(name)` is
    told as each long stage starts (the CLI shows it with elapsed seconds; None: silent).
    """
    stage = on_stage or (lambda name: None)
    graph_dir, out_file = Path(graph_dir), Path(out_file)
    recipe = read_slots_recipe(graph_dir)
    if out_file.exists():
        raise ExportError(f"{out_file}: already exists; choose another -o or remove it")
    if not out_file.parent.is_dir():
        raise ExportError(f"{out_file.parent}: no such folder")
    base_path = Path(base_dir) if base_dir is not None else Path(recipe["base"]["path"])
    if not (base_path / "config.json").is_file():
        raise ExportError(f"{base_path}: the graph's base model is not there (give --base)")
    dtype = recipe["dtype"]
    atol_v, rtol_v = tolerances(dtype, atol, rtol)
    layout = SlotLayout.from_list(recipe["slots"])
    stage("building the base model")
    base = BaseModel(base_path)
    spec = slot_spec(base.config, base.task, bool(recipe.get("kv_cache")))
    pairs = fit(adapter.label, bind(adapter, base.shapes), layout, str(graph_dir))
    if not pairs:
        raise ExportError(f"{adapter.label}: targets no module of the base model")
    chosen = choose_provider(provider)
    params = parameters(pairs, weight, dtype)
    tmp = out_file.parent / f".{out_file.name}.check-{os.getpid()}{ADAPTER_SUFFIX}"
    try:
        stage("writing the adapter file")
        write_adapter_file(tmp, params)
        stage(f"validating vs base + {adapter.label} unmerged")
        validation = validate_adapter_files(graph_dir / GRAPH_NAME, base.model, spec,
                                            [(adapter.label, tmp)], [adapter], [weight], chosen, provider,
                                            atol_v, rtol_v, dtype)
        if not validation["passed"]:
            raise ValidationFailed(validation["failure"])
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return {"output": str(out_file), "graph": str(graph_dir), "weight": weight, "dtype": dtype,
            "sha256": hash_file(out_file)[0], "bytes": out_file.stat().st_size,
            "parameters": {k: list(v.shape) for k, v in params.items()},
            "modules": sorted({s.module for s, _ in pairs}), "validation": validation}
