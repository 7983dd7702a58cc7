"""Slot-graph jobs from options to registered outputs: what `adapters export --slots` and `adapters pack` run.

- `run_slots_export(SlotsOptions)`: resolve the adapter arguments (folders or registry
  references, as `adapters merge` does), export and validate the slots (or mixed) graph,
  register it as an `onnx_slots` artifact whose inputs are the registry versions given.
- `run_pack(PackOptions)`: resolve one adapter, write and validate its `.onnx_adapter`
  file for a slots graph, register it as an `onnx_adapter` artifact: its input is the
  adapter version (with the weight), its recipe names the graph (path, graph digest and,
  when the graph was registered, its artifact reference). Lineage therefore reads
  version -> adapter file -> graph.

The base (`--base`) is a folder or `hf:ORG/NAME[@REVISION]`, resolved as `adapters merge`
resolves it (`registry.hub.resolve_base`: the Hugging Face cache, a view in the home); a
Hub base's repo and commit are recorded in the graph's export.json and recipe, and `pack`
without `--base` finds that base again by its commit when the recorded folder is gone.

Errors: `ExportError`/`MoraCoreError`/`RegistryError` for bad input (nothing written,
store unchanged), `ValidationFailed` when a check fails (nothing kept).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.errors import ExportError

StageFn = Callable[[str], None]
KIND_SLOTS = "onnx_slots"
KIND_ADAPTER = "onnx_adapter"


@dataclass
class SlotsOptions:
    """One slots export. `adapters`: folders or registry references, in order (their positions
    are the `adapter_index` values of a mixed graph)."""

    adapters: list[str]
    base_dir: Path | str  # a folder or hf:ORG/NAME[@REVISION]
    out_dir: Path
    mixed: bool = False
    dtype: str = "float32"
    opset: int | None = None
    provider: str = "auto"
    atol: float | None = None
    rtol: float | None = None
    kv_cache: bool = True  # decoders: the KV-cache signature of a merged export (False: the plain one)
    allow_base_mismatch: bool = False
    home: Path | None = None
    db_url: str | None = None
    register: bool = True
    on_stage: StageFn | None = field(default=None, repr=False)  # `(name)` as each long stage starts

    def check(self) -> None:
        if not self.adapters:
            raise ExportError("--slots: no adapters given")
        _check_tolerances(self.atol, self.rtol)


@dataclass
class PackOptions:
    """One adapter file: `adapter` (folder or reference) at `weight` for the slots graph `graph_dir`."""

    adapter: str
    graph_dir: Path
    out_file: Path
    weight: float = 1.0
    base_dir: Path | str | None = None  # a folder or hf:ORG/NAME[@REVISION]; None: the graph's
    provider: str = "auto"
    atol: float | None = None
    rtol: float | None = None
    allow_base_mismatch: bool = False
    home: Path | None = None
    db_url: str | None = None
    register: bool = True
    on_stage: StageFn | None = field(default=None, repr=False)  # `(name)` as each long stage starts

    def check(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ExportError(f"--weight {w!r}: a finite number is needed")
        if not str(self.out_file).endswith(".onnx_adapter"):
            raise ExportError(f"-o {self.out_file}: an adapter file is named *.onnx_adapter")
        _check_tolerances(self.atol, self.rtol)


def _check_tolerances(atol: float | None, rtol: float | None) -> None:
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ExportError(f"--{name} {v}: a finite, non-negative number is needed")


def run_slots_export(opts: SlotsOptions) -> dict[str, Any]:
    """Export, validate and register one slots (or mixed) graph; returns the summary (JSON-able)."""
    started = time.perf_counter()
    opts.check()
    from exporters.inputs import resolve_adapters
    from exporters.pipeline import _RegistryHandle
    from exporters.recipe import register_output
    from exporters.slots import export_slots_onnx
    from mora_core.checkpoint import open_checkpoint
    from registry.hub import resolve_base

    base = resolve_base(opts.base_dir, opts.home)  # one resolver with merge and push
    hub = {"repo": base.repo_id, "commit": base.commit} if base.repo_id else None
    with contextlib.ExitStack() as stack:
        registry = _RegistryHandle(opts.home, opts.db_url)
        stack.callback(registry.close)
        if opts.on_stage is not None:
            opts.on_stage("resolving the adapters")
        resolved = resolve_adapters(opts.adapters, base.folder, registry.get, opts.allow_base_mismatch)
        summary = {"to": "onnx", "format": KIND_SLOTS, **export_slots_onnx(
            base.folder, [r.adapter for r in resolved], opts.out_dir, mixed=opts.mixed, dtype=opts.dtype,
            opset=opts.opset, provider=opts.provider, atol=opts.atol, rtol=opts.rtol,
            kv_cache=None if opts.kv_cache else False, on_stage=opts.on_stage, hub=hub)}
        weights = [1.0] * len(resolved)
        summary["adapters"] = [{**r.describe(1.0), "position": i} for i, r in enumerate(resolved)]
        if hub:
            summary["base"] = {**hub, "folder": str(base.folder)}
        if opts.register:
            if opts.on_stage is not None:
                opts.on_stage("registering the artifact (hashing the base)")
            store, checkpoint = registry.get(), open_checkpoint(base.folder)
            summary["artifact"] = register_output(store, KIND_SLOTS, opts.out_dir, summary.get("digests"), checkpoint,
                                                  store.file_digests(checkpoint.paths), resolved, weights,
                                                  opts.dtype, "float32", summary, hub=hub)
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    return summary


def run_pack(opts: PackOptions) -> dict[str, Any]:
    """Write, validate and register one `.onnx_adapter` file; returns the summary (JSON-able)."""
    opts.check()
    from exporters.inputs import resolve_adapters
    from exporters.pipeline import _RegistryHandle
    from exporters.recipe import tool_versions
    from exporters.slots import pack_adapter, read_slots_recipe

    stage = opts.on_stage or (lambda name: None)
    stage("resolving the graph, the base and the adapter")
    recipe = read_slots_recipe(opts.graph_dir)
    base_dir = _pack_base(opts, recipe)
    with contextlib.ExitStack() as stack:
        registry = _RegistryHandle(opts.home, opts.db_url)
        stack.callback(registry.close)
        (resolved,) = resolve_adapters([opts.adapter], base_dir, registry.get, opts.allow_base_mismatch)
        summary = pack_adapter(resolved.adapter, opts.graph_dir, opts.out_file, weight=float(opts.weight),
                               base_dir=base_dir, provider=opts.provider, atol=opts.atol, rtol=opts.rtol,
                               on_stage=opts.on_stage)
        summary["adapter"] = resolved.describe(float(opts.weight))
        graph = {"path": str(Path(opts.graph_dir).resolve()), "files": recipe["files"], "artifact": None}
        if opts.register:
            stage("registering the artifact")
            graph["artifact"] = _graph_artifact(registry.get(), Path(opts.graph_dir))
            pack_recipe = {"kind": KIND_ADAPTER, "adapter": summary["adapter"], "weight": float(opts.weight),
                           "graph": graph, "dtype": summary["dtype"], "parameters": summary["parameters"],
                           "format": "onnxruntime AdapterFormat (LoraAdapter.Load + RunOptions.add_active_adapter)",
                           "tools": tool_versions()}
            inputs = [(resolved.ref, float(opts.weight))] if resolved.version is not None else []
            info = registry.get().register_artifact(kind=KIND_ADAPTER, path=opts.out_file, recipe=pack_recipe,
                                                    inputs=inputs, report=summary["validation"])
            summary["artifact"] = info.to_dict()
        summary["graph"] = graph
    return summary


def _pack_base(opts: PackOptions, recipe: dict[str, Any]) -> Path:
    """The base folder of a pack: `--base` (a folder or hf:...), else the graph's recorded
    folder, else (that folder gone) the graph's Hub base again at its recorded commit."""
    from registry.hub import resolve_base

    if opts.base_dir is not None:
        return resolve_base(opts.base_dir, opts.home).folder
    recorded = recipe.get("base") or {}
    folder = Path(recorded.get("path") or ".")
    hub = recorded.get("hub")
    if not (folder / "config.json").is_file() and isinstance(hub, dict) and hub.get("repo") and hub.get("commit"):
        return resolve_base(f"hf:{hub['repo']}@{hub['commit']}", opts.home).folder
    return folder


def _graph_artifact(registry: Any, graph_dir: Path) -> str | None:
    """The artifact reference of a registered graph folder (found by its content digest), or None."""
    from registry.artifacts import hash_files
    from registry.digests import artifact_digest
    from registry.errors import RegistryError

    digest = artifact_digest(KIND_SLOTS, hash_files(Path(graph_dir).resolve()))
    try:
        return f"artifact:{registry.artifact(f'artifact@{digest}').id}"
    except RegistryError:
        return None
