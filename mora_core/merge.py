"""Folding adapters into base weights: one tensor, a state dict, or a whole model folder.

`W' = W + sum_i w_i * dW_i`, accumulated in float32 (or float64) and cast once to the
output dtype; never `W.half() + dW.half()`. The folder merge streams: one base tensor is
read (positioned read, no mmap), merged, cast and appended to an output shard whose header
was laid out up front; unchanged tensors are copied file to file without entering Python.
Peak memory is therefore about one tensor in float32 plus the adapters, whatever the
model size. The output is built in a temporary folder beside the destination and renamed
into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mora_core.adapter import Adapter
from mora_core.errors import MergeError
from mora_core.ops import DeltaOp, DoraOp, ReplaceOp
from mora_core.plan import MergePlan, build_plan
from mora_core.safetensors_io import (
    PlannedTensor,
    SafetensorsFile,
    StreamingSafetensorsWriter,
    all_finite,
    dtype_code,
    torch_dtype,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
# tied output projection -> names its input embedding may have
TIED_OUTPUT = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def needs_base(ops: Sequence[tuple[DeltaOp, float]]) -> bool:
    """Whether some op's update depends on the original base tensor (DoRA, replacements)."""
    return any(isinstance(op, (DoraOp, ReplaceOp)) for op, _ in ops)


def apply_ops(w: torch.Tensor, ops: Sequence[tuple[DeltaOp, float]], base: torch.Tensor | None) -> None:
    """`w += sum weight * dW` in place; `base` is the original tensor (None: `w` is still it)."""
    reference = base if base is not None else w
    if base is None and needs_base(ops):
        reference = w.clone()
    for op, weight in ops:
        op.add_into(w, weight, reference)


def finish(w: torch.Tensor, out_dtype: torch.dtype, name: str) -> torch.Tensor:
    """Cast the accumulated tensor once to `out_dtype` and refuse non-finite results."""
    out = w if w.dtype == out_dtype else w.to(out_dtype)
    check_finite(out, name)
    return out


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise `MergeError` naming the tensor if any element is NaN or Inf."""
    if not all_finite(t):
        raise MergeError(f"merged tensor {name} is not finite in {str(t.dtype).replace('torch.', '')} "
                         "(NaN or Inf; adapter weights too large for the dtype?)")


def merge_tensor(
    base: torch.Tensor,
    ops: Sequence[tuple[DeltaOp, float]],
    out_dtype: torch.dtype | None = None,
    accumulate: torch.dtype = torch.float32,
    name: str = "tensor",
) -> torch.Tensor:
    """`base + sum w * dW` for one tensor, accumulated in `accumulate`, cast once.

    `base` is not modified. Raises `MergeError` naming `name` if the result is not
    finite in the output dtype.
    """
    w = base.to(accumulate, copy=True)
    apply_ops(w, ops, base)
    return finish(w, out_dtype or base.dtype, name)


def merge_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    accumulate: torch.dtype = torch.float32,
    tied: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """In-memory merge: a new state dict with every adapter folded in (same dtypes).

    Tensors no adapter touches are returned as they are (not copied).
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    plan = build_plan({k: tuple(v.shape) for k, v in state_dict.items()}, adapters, weights, tied)
    out = dict(state_dict)
    for alias, source in plan.untied.items():
        out[alias] = state_dict[source]
    for name, ops in plan.ops.items():
        out[name] = merge_tensor(out[name], ops, accumulate=accumulate, name=name)
    return out


# ----------------------------------------------------------------------------- folders


@dataclass
class BaseFolder:
    """A model folder's weight files (in shard order) and headers, validated."""

    root: Path
    files: list[SafetensorsFile]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: info.shape for f in self.files for n, info in f.tensors.items()}

    def config(self) -> dict[str, Any]:
        p = self.root / "config.json"
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise MergeError(f"{p}: not valid JSON ({exc.msg})") from None

    def weight_files(self) -> set[str]:
        return {f.path.name for f in self.files} | {INDEX_NAME}


def open_base(path: str | Path) -> BaseFolder:
    """A base model: a folder with `model.safetensors` or a sharded index, or one .safetensors file."""
    root = Path(path)
    if root.is_file():
        if root.suffix != ".safetensors":
            raise MergeError(f"{root}: only safetensors weights are read (no pickle checkpoints)")
        return BaseFolder(root.parent, [SafetensorsFile(root, MergeError)])
    if not root.is_dir():
        raise MergeError(f"{root}: base model not found")
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MergeError(f"{index}: not a valid safetensors index (no weight_map)") from None
        names = sorted(set(weight_map.values()))
        for n in names:
            if "/" in n or n.startswith(".") or not (root / n).is_file():
                raise MergeError(f"{index}: shard {n!r} is missing or not a plain file name")
        files = [SafetensorsFile(root / n, MergeError) for n in names]
        for f in files:
            for t in f.tensors:
                if weight_map.get(t) != f.path.name:
                    raise MergeError(f"{index}: tensor {t} is in {f.path.name} but the index says {weight_map.get(t)}")
        return BaseFolder(root, files)
    if (root / SINGLE_NAME).is_file():
        return BaseFolder(root, [SafetensorsFile(root / SINGLE_NAME, MergeError)])
    singles = sorted(root.glob("*.safetensors"))
    if len(singles) == 1:
        return BaseFolder(root, [SafetensorsFile(singles[0], MergeError)])
    pickles = [p for p in PICKLE_WEIGHTS if (root / p).exists()]
    if pickles:
        raise MergeError(f"{root / pickles[0]}: pickle checkpoints are refused; convert the base to safetensors")
    raise MergeError(f"{root}: no model.safetensors or {INDEX_NAME} in the base folder")


def tied_pairs(base: BaseFolder) -> dict[str, str]:
    """{omitted tied tensor: the tensor it shares} from the base config and files."""
    config = base.config()
    shapes = base.shapes
    if TIED_OUTPUT in shapes or not config.get("tie_word_embeddings", True):
        return {}
    for name in shapes:
        if name.endswith(EMBEDDING_SUFFIXES):
            return {TIED_OUTPUT: name}
    return {}


@dataclass
class MergeReport:
    output: str
    tensors_total: int
    tensors_merged: int
    keys_used: dict[str, int]
    weights: dict[str, float]
    dtype: str
    accumulate: str
    shards: int
    bytes_written: int
    seconds: float
    peak_rss_mb: float
    untied: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


ProgressFn = Callable[[int, int, str], None]


def merge_folder(
    base_dir: str | Path,
    adapters: Sequence[Adapter],
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    dtype: str = "auto",
    accumulate: str = "float32",
    max_shard_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> MergeReport:
    """Stream-merge `adapters` into the model at `base_dir`, writing a new folder `out_dir`.

    `dtype`: "auto" keeps each tensor's dtype, or one of float16/bfloat16/float32 for all
    floating tensors. `max_shard_bytes`: None keeps the base's sharding, else repacks.
    Every adapter key is resolved and shape-checked before anything is written; `out_dir`
    appears only when complete. Raises `MergeError`/`AdapterError` for bad input.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out}: output already exists; choose another -o or remove it")
    if dtype != "auto" and dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not auto, {', '.join(DTYPES)}")
    if accumulate not in ACCUMULATE:
        raise MergeError(f"accumulate dtype {accumulate!r} is not one of {', '.join(ACCUMULATE)}")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    for w in weights:
        if not math.isfinite(w):
            raise MergeError(f"adapter weight {w} is not finite")
    base = open_base(base_dir)
    tied = tied_pairs(base)
    plan = build_plan(base.shapes, adapters, weights, tied)

    layout, sources = _layout(base, plan, dtype, max_shard_bytes)
    total_bytes = sum(t.nbytes for shard in layout for t in shard)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    done = 0
    workspace = _Workspace(ACCUMULATE[accumulate])
    syncing = ThreadPoolExecutor(max_workers=1)  # fsync of shard k overlaps work on shard k+1
    pending = []
    try:
        names = _shard_names(len(layout))
        weight_map: dict[str, str] = {}
        for shard_name, shard in zip(names, layout):
            writer = StreamingSafetensorsWriter(tmp / shard_name, shard, metadata={"format": "pt"})
            try:
                for planned in shard:
                    src_file, src_name = sources[planned.name]
                    info = src_file.tensors[src_name]
                    ops = plan.ops.get(planned.name, [])
                    if not ops and planned.dtype == info.dtype and src_name == planned.name:
                        writer.copy_raw(src_name, src_file)
                    else:
                        writer.write(planned.name, workspace.merge(src_file, src_name, ops, planned))
                    weight_map[planned.name] = shard_name
                    done += planned.nbytes
                    if progress:
                        progress(done, total_bytes, planned.name)
                writer.close(sync=False)
            except BaseException:
                writer.abort()
                raise
            pending.append(syncing.submit(writer.sync_and_close))
        for job in pending:
            job.result()
        if len(layout) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(base, tmp, dtype, bool(plan.untied))
        _fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        syncing.shutdown(wait=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    syncing.shutdown(wait=True)
    return MergeReport(
        output=str(out),
        tensors_total=sum(len(s) for s in layout),
        tensors_merged=len(plan.ops),
        keys_used=plan.keys_used,
        weights={a.label: w for a, w in zip(adapters, weights)},
        dtype=dtype,
        accumulate=accumulate,
        shards=len(layout),
        bytes_written=total_bytes,
        seconds=round(time.perf_counter() - start, 3),
        peak_rss_mb=round(_peak_rss_mb(), 1),
        untied=plan.untied,
    )


class _Workspace:
    """Buffers reused from tensor to tensor of a streaming merge.

    Fresh memory costs a page fault per page (about as much as the merge arithmetic on
    these machines), so the float32 working copy and the cast output live in buffers
    that only grow; the base tensor itself is read in place through a short-lived memory
    map. Peak: working copy + output + the mapped tensor, i.e. at most 4x the largest
    merged tensor in bf16.
    """

    def __init__(self, accumulate: torch.dtype):
        self._work = torch.empty(0, dtype=accumulate)
        self._out = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def _grow(buf: torch.Tensor, numel: int) -> torch.Tensor:
        return buf if buf.numel() >= numel else torch.empty(numel, dtype=buf.dtype)

    def merge(self, src: SafetensorsFile, src_name: str, ops: Sequence[tuple[DeltaOp, float]],
              planned: PlannedTensor) -> torch.Tensor:
        """Read, merge and cast one tensor; the result is valid until the next call."""
        info = src.tensors[src_name]
        out_dtype = torch_dtype(planned.dtype)
        out_bytes = info.numel * out_dtype.itemsize
        self._out = self._grow(self._out, out_bytes)
        out = self._out[:out_bytes].view(out_dtype).view(info.shape)
        with src.mapped(src_name) as raw:
            if not ops:
                out.copy_(raw)
                return out
            self._work = self._grow(self._work, info.numel)
            w = self._work[: info.numel].view(info.shape)
            w.copy_(raw)
            apply_ops(w, ops, raw if needs_base(ops) else None)
            del raw
        out.copy_(w)
        check_finite(out, planned.name)
        return out


def _layout(base: BaseFolder, plan: MergePlan, dtype: str, max_shard_bytes: int | None):
    """Output shards (lists of planned tensors) and, per output name, its source tensor."""
    float_codes = {"F16", "BF16", "F32", "F64"}
    target = dtype_code(DTYPES[dtype]) if dtype != "auto" else None
    sources: dict[str, tuple[SafetensorsFile, str]] = {}
    shards: list[list[PlannedTensor]] = []
    for f in base.files:
        shard: list[PlannedTensor] = []
        for name, info in f.tensors.items():
            code = target if target and info.dtype in float_codes else info.dtype
            shard.append(PlannedTensor(name, code, info.shape))
            sources[name] = (f, name)
            for alias, source in plan.untied.items():
                if source == name:
                    shard.append(PlannedTensor(alias, code, info.shape))
                    sources[alias] = (f, name)
        shards.append(shard)
    if max_shard_bytes:
        flat = [t for s in shards for t in s]
        shards, current, size = [], [], 0
        for t in flat:
            if current and size + t.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(t)
            size += t.nbytes
        shards.append(current)
    return [s for s in shards if s] or [[]], sources


def _copy_side_files(base: BaseFolder, dest: Path, dtype: str, untied: bool) -> None:
    """Copy config, tokenizer and other small files; record dtype/untying in config.json."""
    skip = base.weight_files()
    for p in sorted(base.root.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors") \
                and p.name not in PICKLE_WEIGHTS:
            shutil.copy2(p, dest / p.name)
    cfg_path = dest / "config.json"
    if cfg_path.is_file() and (dtype != "auto" or untied):
        cfg = json.loads(cfg_path.read_text())
        if dtype != "auto":
            cfg["torch_dtype"] = dtype
            if "dtype" in cfg:
                cfg["dtype"] = dtype
        if untied:
            cfg["tie_word_embeddings"] = False
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
