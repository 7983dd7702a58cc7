"""One merge job, from options to a registered output: what `adapters merge` (and batch jobs) run.

`MergeOptions` holds everything a merge needs (mergekit's one-options-object idea); the
command line only builds it. `run_merge(options)` resolves the adapter arguments (local
PEFT folders, or registry references materialised and checked against the base), merges
to a safetensors folder or to a validated ONNX graph, registers the output as an artifact
with its lineage, and returns a JSON-able summary.

Errors: `ExportError`/`MoraCoreError`/`RegistryError` for bad input (nothing written,
store unchanged), `ValidationFailed` when the ONNX check fails (nothing kept).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.errors import ExportError
from registry.faults import fault_point

TARGETS = ("safetensors", "onnx")
DTYPES = ("auto", "float16", "bfloat16", "float32")
ONNX_DTYPES = ("auto", "float32", "float16", "int4")  # int4: MatMulNBits weights (exporters.quantize)
ACCUMULATE = ("float32", "float64")
ProgressFn = Callable[[int, int, str], None]
StageFn = Callable[[str], None]
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class MergeOptions:
    """Everything one merge needs. `check()` validates it before any work starts.

    Args:
        adapters: local PEFT folders or registry references, in order.
        base_dir: the base model folder (config.json + safetensors, sharded or not), or
            `hf:ORG/NAME[@REVISION]`, resolved through the Hugging Face cache (its repo and
            commit are recorded in the output's recipe).
        target: "safetensors" or "onnx".
        out_dir: the output folder; must not exist (or be an empty folder).
        weights: one per adapter (default 1.0 each): `W' = W + sum w_i dW_i`.
        dtype: output dtype of floating tensors ("auto" keeps the base's; ONNX: float32, float16 or int4).
        accumulate: accumulation dtype of the merge (cast once at the end).
        max_shard_bytes: repack safetensors shards to at most this; None keeps the base's sharding.
        opset, provider, atol, rtol, validate: the ONNX export and its validation.
        kv_cache: decoders get the KV-cache graph + genai_config.json (False: the plain graph).
        graph_writer: "auto", "fused" or "torch" (`exporters.onnx_export.export_merged_onnx`).
        allow_base_mismatch: merge a registry version onto a base other than the one recorded.
        home, db_url, blob_url: the registry (for references and registration).
        register: record the output as an artifact (ONNX: only when validated).
        registry_process: register through a store opened in a separate process
            (`registry.worker`), started first, so that its imports and the store's opening
            (~0.4 s) run beside torch's import instead of before it. Taken when every adapter
            is a folder (references are read through this process). The CLI sets it; a
            library caller that already imported the registry gains nothing from it.
        replace_output: an existing `out_dir` is replaced, atomically, once the new output is
            complete (batch jobs re-run on changed inputs); otherwise it must not exist.
        progress: `(done, total, what)` callback for counted work within a stage (merge bytes).
        on_stage: `(name)` callback at the start of each long stage ("resolving adapters",
            "merging", "exporting to ONNX", "registering"...): the CLI shows it with its
            elapsed time on a TTY. Library code never prints.
    """

    adapters: list[str]
    base_dir: Path
    target: str
    out_dir: Path
    weights: list[float] | None = None
    dtype: str = "auto"
    accumulate: str = "float32"
    max_shard_bytes: int | None = None
    opset: int | None = None
    provider: str = "auto"
    atol: float | None = None
    rtol: float | None = None
    validate: bool = True
    kv_cache: bool = True
    graph_writer: str = "auto"
    allow_base_mismatch: bool = False
    home: Path | None = None
    db_url: str | None = None
    blob_url: str | None = None
    register: bool = True
    registry_process: bool = False
    replace_output: bool = False
    progress: ProgressFn | None = field(default=None, repr=False)
    on_stage: StageFn | None = field(default=None, repr=False)

    def stage(self, name: str) -> None:
        """Report the start of stage `name` (nothing when no one listens)."""
        if self.on_stage is not None:
            self.on_stage(name)

    def weight_list(self) -> list[float]:
        return list(self.weights) if self.weights else [1.0] * len(self.adapters)

    def check(self, *, output: bool = True) -> None:
        """Raise `ExportError` naming the first bad option; touches nothing, reads no file.

        Every numeric option goes through `check_number` (finite, in range, of the right
        type), so `--weight nan`, `--atol -1` or `--max-shard-size 0` are refused here,
        before any adapter is read or any export starts. `output`: also refuse an
        existing output (`check_output`).
        """
        if not self.adapters:
            raise ExportError("no adapters given")
        if self.target not in TARGETS:
            raise ExportError(f"--to {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.weights and len(self.weights) != len(self.adapters):
            raise ExportError(f"{len(self.adapters)} adapters but {len(self.weights)} --weight values "
                              "(give none or one each)")
        # a weight multiplies dW in the accumulation dtype: it must be representable there
        limit = FLOAT32_MAX if self.accumulate == "float32" else None
        for w in self.weight_list():
            check_number("--weight", w, lo=None if limit is None else -limit, hi=limit,
                         why=f"the weight must fit the {self.accumulate} accumulation")
        allowed = ONNX_DTYPES if self.target == "onnx" else DTYPES
        if self.dtype not in allowed:
            raise ExportError(f"--dtype {self.dtype} is not supported for {self.target} "
                              f"({', '.join(allowed)})")
        if self.accumulate not in ACCUMULATE:
            raise ExportError(f"--accumulate {self.accumulate!r}: expected one of {', '.join(ACCUMULATE)}")
        if self.max_shard_bytes is not None:
            check_number("--max-shard-size", self.max_shard_bytes, lo=1, hi=2**62, integer=True)
        if self.opset is not None:
            check_number("--opset", self.opset, lo=1, hi=1000, integer=True)
        for name in ("atol", "rtol"):
            if getattr(self, name) is not None:
                check_number(f"--{name}", getattr(self, name), lo=0)
        if output:
            self.check_output()

    def check_output(self) -> None:
        """`ExportError` if anything exists at the output (an empty folder too) unless it is to be replaced."""
        if not self.replace_output:
            from exporters.outputs import refuse_existing

            refuse_existing(Path(self.out_dir))

    @property
    def registers(self) -> bool:
        """Whether the output is recorded as an artifact (ONNX: only when validated)."""
        return self.register and (self.target == "safetensors" or self.validate)


FLOAT32_MAX = 3.4028234663852886e38


def check_number(option: str, value: Any, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, why: str = "") -> None:
    """The one validator of numeric options: a finite number (an integer if asked) in [lo, hi]."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    bounds = (lo is None or value >= lo) and (hi is None or value <= hi) if ok else False
    if not ok or not bounds:
        what = "an integer" if integer else "a finite number"
        fmt = (lambda v: str(v)) if integer else (lambda v: f"{v:g}")
        rng = (f" between {fmt(lo)} and {fmt(hi)}" if lo is not None and hi is not None
               else f" >= {fmt(lo)}" if lo is not None else f" <= {fmt(hi)}" if hi is not None else "")
        raise ExportError(f"{option} {value!r}: {what}{rng} is needed" + (f" ({why})" if why else ""))


def run_merge(opts: MergeOptions) -> dict[str, Any]:
    """Run one merge job; see the module docstring. Returns the summary (JSON-able)."""
    started = time.perf_counter()
    opts.check(output=False)
    weights = opts.weight_list()
    from exporters.outputs import replace_folder
    from exporters.recipe import AdapterDigests, register_output
    from mora_core.checkpoint import open_checkpoint
    from registry.hub import resolve_base

    # a folder as it is; hf:ORG/NAME[@REV] through the HF cache, read from a view in the home
    opts.stage("resolving the base and the adapters")
    base = resolve_base(opts.base_dir, opts.home)
    base_dir = base.folder
    final = Path(opts.out_dir)
    with contextlib.ExitStack() as stack:
        worker = opts.registers and opts.registry_process and all(Path(a).is_dir() for a in opts.adapters)
        registry = _RegistryHandle(opts.home, opts.db_url, opts.blob_url, worker=worker)
        stack.callback(registry.close)
        checkpoint = open_checkpoint(base_dir)  # once: merge, export and recipe share it
        base_digests = None
        with _collector_paused():  # SQLAlchemy's and torch's imports
            if opts.registers:  # what the store's cache lacks is hashed from now on, beside torch's import and the merge
                base_digests = registry.base_digests(checkpoint.paths)
                stack.callback(base_digests.cancel)  # a failed run does not wait for the hash (no-op once done)
            from exporters.inputs import resolve_adapters  # imports torch

        resolved = resolve_adapters(opts.adapters, base_dir, registry.for_references, opts.allow_base_mismatch)
        loaded = [r.adapter for r in resolved]
        reclaimed = _reclaim(registry, final) if opts.registers and not opts.replace_output else []
        opts.check_output()
        replacing = opts.replace_output and final.exists()
        build = final.parent / f".{final.name}.replacement-{os.getpid()}" if replacing else final
        if replacing:
            stack.callback(shutil.rmtree, build, ignore_errors=True)
        token = None
        if opts.registers:  # recorded before the first byte: a kill leaves a known, cleanable output
            token = registry.get(create=True).begin_output(final, opts.target)
            stack.callback(_end_unless_registered, registry, token)
        # the adapters' digests (the card's and the record's), found beside the merge
        adapter_digests = AdapterDigests(registry.get() if opts.registers else None, resolved)
        card = _output_card(opts, checkpoint, resolved, weights,
                            {"repo": base.repo_id, "commit": base.commit} if base.repo_id else None,
                            adapter_digests.result)
        if opts.target == "safetensors":
            from exporters.safetensors_out import merge_folder

            opts.stage("merging")
            report = merge_folder(checkpoint, loaded, build, weights, dtype=opts.dtype,
                                  accumulate=opts.accumulate, max_shard_bytes=opts.max_shard_bytes,
                                  progress=opts.progress, digests=opts.registers, finish=card).to_dict()
            summary: dict[str, Any] = {"to": "safetensors", **report}
        else:
            from exporters.onnx_export import export_merged_onnx

            summary = {"to": "onnx", **export_merged_onnx(
                base_dir, loaded, weights, build,
                dtype="float32" if opts.dtype == "auto" else opts.dtype, opset=opts.opset,
                provider=opts.provider, atol=opts.atol, rtol=opts.rtol, validate=opts.validate,
                accumulate=opts.accumulate, on_stage=opts.on_stage, checkpoint=checkpoint, finish=card,
                kv_cache=None if opts.kv_cache else False, graph_writer=opts.graph_writer)}
        if base_digests is not None:
            opts.stage("hashing the base (for the record)")
        base_files = base_digests.result(registry.get()) if base_digests is not None else {}
        if replacing:
            replace_folder(build, final)
            summary["output"] = str(final)
            summary["replaced"] = True
        if token is not None:
            registry.get().output_placed(token, final)
            fault_point("output_placed")
        _keep_sources_restrictive(final, base_dir, resolved)
        summary["adapters"] = [r.describe(w) for r, w in zip(resolved, weights)]
        effective_dtype = summary.get("dtype", opts.dtype)  # what the output holds ("auto" resolved)
        if opts.registers:
            from exporters.card import merge_figures

            opts.stage("registering the artifact")
            facts = {**summary, "merge": merge_figures(summary)} if opts.target == "safetensors" else summary
            summary["artifact"] = register_output(
                registry.get(), opts.target, final, summary["digests"], checkpoint, base_files, resolved, weights,
                effective_dtype, opts.accumulate, facts, output=token,
                hub={"repo": base.repo_id, "commit": base.commit} if base.repo_id else None,
                adapter_digests=adapter_digests.result())
            registry.registered = True
        if reclaimed:
            summary["reclaimed"] = reclaimed
        if base.repo_id:
            summary["base"] = {"repo": base.repo_id, "commit": base.commit, "folder": str(base_dir)}
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    return summary


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block of heavy imports, and what they left
    alive frozen (`gc.freeze`) after it.

    Importing torch (and SQLAlchemy) creates about a million objects that live as long as
    the process; collections during the import walk that growing heap again and again
    (measured: `import torch` and the registry's imports took ~2.1 s of CPU with the
    collector on, ~1.6 s with it off). Frozen, those module-level objects are skipped by
    every later collection. The collector's previous state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _output_card(opts: MergeOptions, checkpoint: Any, resolved: list, weights: list[float],
                 hub: dict[str, str] | None, digests: Callable[[], list[str | None]]) -> Any:
    """The model card hook of this job's output (exporters.card)."""
    from exporters.card import OutputCard

    return OutputCard(opts.target, checkpoint, resolved, weights, opts.dtype, opts.accumulate, hub,
                      name=Path(opts.out_dir).name, digests=digests)


def _reclaim(registry: _RegistryHandle, final: Path) -> list[str]:
    """Remove what a killed merge to the same output left (registry.outputs.reclaim); [] if the
    store does not exist yet (nothing can have been recorded there)."""
    reg = registry.existing()
    return reg.reclaim_output(final) if reg is not None else []


def _end_unless_registered(registry: _RegistryHandle, token: int) -> None:
    """On failure (exception, not a kill) the pending output is forgotten: its writer cleaned up."""
    if not registry.registered:
        registry.get().end_output(token)


def _keep_sources_restrictive(out: Path, base_dir: Path, resolved: list) -> None:
    """Give the output's files the permission bits all their sources share (registry.modes): a
    0600 base or adapter file makes the whole output 0600, its folder 0700."""
    from registry.modes import apply_modes, mode_of_files

    sources = [p for p in Path(base_dir).iterdir() if p.is_file() and not p.is_symlink()]
    for r in resolved:
        if r.adapter.path is not None:
            sources += [p for p in Path(r.adapter.path).iterdir() if p.is_file() and not p.is_symlink()]
    apply_modes(out, mode_of_files(sources))


def parse_size(text: str | int) -> int:
    """A byte size like `2GB`, `500MB`, `1.5GiB` or `1048576`: a positive whole number of bytes.

    Raises `ExportError` naming the text otherwise (also for `-5`, `0.5b`, `nan`).
    """
    if isinstance(text, bool):
        raise ExportError(f"size {text!r} is not a size like 2GB or 500MB")
    if isinstance(text, int):
        n, unit = float(text), "b"
    else:
        t = str(text).strip().lower()
        unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if t.endswith(u)), "b")
        number = t[: -len(unit)].strip() if t.endswith(unit) else t
        try:
            n = float(number)
        except ValueError:
            raise ExportError(f"size {text!r} is not a size like 2GB or 500MB") from None
    size = n * SIZE_UNITS[unit]
    if not (math.isfinite(size) and 1 <= size < 2**63) or size != int(size):
        raise ExportError(f"size {text!r} is not a positive whole number of bytes")
    return int(size)


class _RegistryHandle:
    """One registry handle per job, opened on first use and closed at the end: the store in
    this process (`registry.api.Registry`), or with `worker` in a separate process started
    now (`registry.worker.RegistryWorker`, which answers the verbs a merge uses)."""

    def __init__(self, home: Path | None, db_url: str | None, blob_url: str | None = None, *,
                 worker: bool = False):
        self._home, self._db_url, self._blob_url, self._reg = home, db_url, blob_url, None
        self._local = None  # references read in this process when the store is in a worker
        self._worker = None
        if worker:
            from registry.worker import RegistryWorker

            self._worker = RegistryWorker(home, db_url, blob_url)
        self.registered = False

    def get(self, create: bool = False):
        """The store; `create` makes it when missing (only for registering: reading creates nothing)."""
        if self._reg is None:
            if self._worker is not None:
                self._reg = self._worker.open(create)
            else:
                self._reg = self._open(create)
        return self._reg

    def _open(self, create: bool):
        from registry.api import Registry

        return Registry.open(self._home, self._db_url, blob_url=self._blob_url, create=create)

    def for_references(self):
        """A store that resolves and materialises references (always in this process)."""
        if self._worker is None:
            return self.get()
        if self._local is None:
            self._local = self._open(False)
        return self._local

    def existing(self):
        """The store, or None when it does not exist yet (nothing is created)."""
        from registry.errors import StoreMissing

        try:
            return self.get()
        except StoreMissing:
            return None

    def base_digests(self, paths: list[Path]):
        """`exporters.recipe.BaseDigests` of the base files `paths`, started now. A worker is
        asked from the hashing thread (it may still be importing); a store here right away."""
        from exporters.recipe import BaseDigests
        from registry.file_digests import lookup

        if self._worker is not None:
            worker = self._worker
            return BaseDigests(lambda: worker.lookup_file_digests(paths), in_thread=True)
        reg = self.existing()
        return BaseDigests(lambda: reg.lookup_file_digests(paths) if reg is not None else lookup(None, paths))

    def close(self) -> None:
        for handle in (self._reg, self._local, self._worker):
            if handle is not None:
                handle.close()
        self._reg = self._local = self._worker = None
