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
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.errors import ExportError

TARGETS = ("safetensors", "onnx")
DTYPES = ("auto", "float16", "bfloat16", "float32")
ONNX_DTYPES = ("auto", "float32", "float16")
ACCUMULATE = ("float32", "float64")
ProgressFn = Callable[[int, int, str], None]
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
        dtype: output dtype of floating tensors ("auto" keeps the base's; ONNX: float32 or float16).
        accumulate: accumulation dtype of the merge (cast once at the end).
        max_shard_bytes: repack safetensors shards to at most this; None keeps the base's sharding.
        opset, provider, atol, rtol, validate: the ONNX export and its validation.
        allow_base_mismatch: merge a registry version onto a base other than the one recorded.
        home, db_url, blob_url: the registry (for references and registration).
        register: record the output as an artifact (ONNX: only when validated).
        replace_output: an existing `out_dir` is replaced, atomically, once the new output is
            complete (batch jobs re-run on changed inputs); otherwise it must not exist.
        progress: `(done, total, what)` callback for long stages.
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
    allow_base_mismatch: bool = False
    home: Path | None = None
    db_url: str | None = None
    blob_url: str | None = None
    register: bool = True
    replace_output: bool = False
    progress: ProgressFn | None = field(default=None, repr=False)

    def weight_list(self) -> list[float]:
        return list(self.weights) if self.weights else [1.0] * len(self.adapters)

    def check(self) -> None:
        """Raise `ExportError` naming the first bad option; touches nothing."""
        if not self.adapters:
            raise ExportError("no adapters given")
        if self.target not in TARGETS:
            raise ExportError(f"--to {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.weights and len(self.weights) != len(self.adapters):
            raise ExportError(f"{len(self.adapters)} adapters but {len(self.weights)} --weight values "
                              "(give none or one each)")
        for w in self.weight_list():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ExportError(f"--weight {w!r}: a finite number is needed")
        allowed = ONNX_DTYPES if self.target == "onnx" else DTYPES
        if self.dtype not in allowed:
            raise ExportError(f"--dtype {self.dtype} is not supported for {self.target} "
                              f"({', '.join(allowed)})")
        if self.accumulate not in ACCUMULATE:
            raise ExportError(f"--accumulate {self.accumulate!r}: expected one of {', '.join(ACCUMULATE)}")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1:
            raise ExportError(f"--max-shard-size {self.max_shard_bytes}: must be positive")
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ExportError(f"--{name} {v}: a finite, non-negative number is needed")
        out = Path(self.out_dir)
        if not self.replace_output and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"{out}: output already exists; choose another -o or remove it")


def run_merge(opts: MergeOptions) -> dict[str, Any]:
    """Run one merge job; see the module docstring. Returns the summary (JSON-able)."""
    started = time.perf_counter()
    opts.check()
    weights = opts.weight_list()
    from exporters.inputs import register_output, resolve_adapters
    from registry.config import resolve_home
    from registry.hub import is_hub_ref, resolve_base

    # a folder as it is; hf:ORG/NAME[@REV] through the HF cache, read from a view in the home
    base = resolve_base(opts.base_dir, resolve_home(opts.home) if is_hub_ref(opts.base_dir) else Path("."))
    base_dir = base.folder
    final = Path(opts.out_dir)
    replacing = opts.replace_output and final.exists()
    build = final.parent / f".{final.name}.replacement-{os.getpid()}" if replacing else final
    with contextlib.ExitStack() as stack:
        registry = _RegistryHandle(opts.home, opts.db_url, opts.blob_url)
        stack.callback(registry.close)
        if replacing:
            stack.callback(shutil.rmtree, build, ignore_errors=True)
        resolved = resolve_adapters(opts.adapters, base_dir, registry.get, opts.allow_base_mismatch)
        loaded = [r.adapter for r in resolved]
        if opts.target == "safetensors":
            from exporters.safetensors_out import merge_folder

            report = merge_folder(base_dir, loaded, build, weights, dtype=opts.dtype,
                                  accumulate=opts.accumulate, max_shard_bytes=opts.max_shard_bytes,
                                  progress=opts.progress).to_dict()
            summary: dict[str, Any] = {"to": "safetensors", **report}
        else:
            from exporters.onnx_export import export_merged_onnx

            summary = {"to": "onnx", **export_merged_onnx(
                base_dir, loaded, weights, build,
                dtype="float32" if opts.dtype == "auto" else opts.dtype, opset=opts.opset,
                provider=opts.provider, atol=opts.atol, rtol=opts.rtol, validate=opts.validate,
                accumulate=opts.accumulate, progress=opts.progress)}
        if replacing:
            _swap_into_place(build, final)
            summary["output"] = str(final)
            summary["replaced"] = True
        summary["adapters"] = [r.describe(w) for r, w in zip(resolved, weights)]
        effective_dtype = summary.get("dtype", opts.dtype) if opts.target == "onnx" else opts.dtype
        if opts.register and (opts.target == "safetensors" or opts.validate):
            summary["artifact"] = register_output(
                registry.get(), opts.target, final, base_dir, resolved, weights,
                effective_dtype, opts.accumulate, summary,
                hub={"repo": base.repo_id, "commit": base.commit} if base.repo_id else None)
        if base.repo_id:
            summary["base"] = {"repo": base.repo_id, "commit": base.commit, "folder": str(base_dir)}
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    return summary


def _swap_into_place(new: Path, final: Path) -> None:
    """Replace the folder `final` by the complete folder `new`: two renames, the old one then removed."""
    old = final.parent / f".{final.name}.replaced-{os.getpid()}"
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    """One registry handle per job, opened on first use and closed at the end."""

    def __init__(self, home: Path | None, db_url: str | None, blob_url: str | None = None):
        self._home, self._db_url, self._blob_url, self._reg = home, db_url, blob_url, None

    def get(self):
        if self._reg is None:
            from registry.api import Registry

            self._reg = Registry.open(self._home, self._db_url, blob_url=self._blob_url)
        return self._reg

    def close(self) -> None:
        if self._reg is not None:
            self._reg.close()
            self._reg = None
