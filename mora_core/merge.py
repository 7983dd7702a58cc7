"""Folding adapters into base weights: the math and the streaming loop, nothing else.

`W' = W + sum_i w_i * dW_i`, accumulated in float32 (or float64) and cast once to the
output dtype; never `W.half() + dW.half()`. `merge_tensor`/`merge_state_dict` do it in
memory; `stream_merge` does it for a whole checkpoint, one tensor at a time: each base
tensor is read in place through a short-lived private memory map of its bytes (a
footprint merge reads it into the output buffer instead), merged
into a reused float32 buffer, cast and handed to a `TensorWriter`; tensors no adapter
touches are handed over as raw bytes (`TensorWriter.copy`, a kernel copy for files).
Peak memory is about one tensor in float32 plus the adapters, whatever the model size.

The loop never sees a file format (mergekit's `io/` idea): where the tensors go (shard
names, index, side files, temp folder, digests) is the writer's and the caller's policy,
in `exporters`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mora_core.adapter import Adapter
from mora_core.checkpoint import Checkpoint
from mora_core.errors import MergeError
from mora_core.ops import DeltaOp
from mora_core.plan import MergePlan, build_plan
from mora_core.region import Region, disjoint
from mora_core.safetensors_io import (
    PlannedTensor,
    SafetensorsFile,
    all_finite,
    dtype_code,
    torch_dtype,
)
from mora_core.threads import kernel_threads, spare_one_core

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64"})
FLOAT_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def needs_base(ops: Sequence[tuple[DeltaOp, float]]) -> bool:
    """Whether some op's update reads the original base tensor (each op declares it)."""
    return any(op.needs_base for op, _ in ops)


def footprint(ops: Sequence[tuple[DeltaOp, float]]) -> list[Region] | None:
    """The regions some op of `ops` touches (overlaps allowed); None if one touches all."""
    regions: list[Region] = []
    for op, _ in ops:
        mine = op.footprint()
        if mine is None:
            return None
        regions += mine
    return regions


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
        raise not_finite(name, t.dtype)


def not_finite(name: str, dtype: torch.dtype) -> MergeError:
    """The one error for a merged tensor with NaN or Inf in `dtype`."""
    return MergeError(f"merged tensor {name} is not finite in {str(dtype).replace('torch.', '')} "
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


# ----------------------------------------------------------------------------- streaming


class TensorWriter(Protocol):
    """Where a streaming merge puts its tensors; the loop knows nothing else about it.

    `start` receives the whole output layout (shards of planned tensors, in order) before
    any tensor; then every planned tensor arrives exactly once, in that order, either as
    a tensor (`write`) or as unchanged bytes of a source file (`copy`). A written tensor
    stays unchanged until the writer's next `write`/`copy` call returns (the loop
    alternates two buffers), so a writer may keep reading it (e.g. hashing) until then.
    """

    def start(self, shards: Sequence[Sequence[PlannedTensor]]) -> None: ...

    def write(self, planned: PlannedTensor, tensor: torch.Tensor) -> None: ...

    def copy(self, planned: PlannedTensor, source: SafetensorsFile, name: str) -> None: ...


ProgressFn = Callable[[int, int, str], None]


@dataclass
class MergeStats:
    """What a streaming merge did (no file names: those belong to the writer)."""

    tensors_total: int
    tensors_merged: int
    keys_used: dict[str, int]
    dtype: str
    accumulate: str
    shards: int
    bytes_written: int
    untied: dict[str, str] = field(default_factory=dict)
    tensors_changed: int = 0  # merged tensors whose values moved (max |dW| > 0)
    max_abs_delta: float = 0.0  # max |W' - W| over every merged tensor, as stored (output dtype)
    max_abs_delta_tensor: str | None = None
    dtypes: list[str] = field(default_factory=list)  # the floating dtypes the output holds ("auto" resolved)


def check_options(dtype: str, accumulate: str, weights: Sequence[float]) -> None:
    """`MergeError` for an unknown dtype/accumulation dtype or a non-finite weight."""
    if dtype != "auto" and dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not auto, {', '.join(DTYPES)}")
    if accumulate not in ACCUMULATE:
        raise MergeError(f"accumulate dtype {accumulate!r} is not one of {', '.join(ACCUMULATE)}")
    for w in weights:
        if not math.isfinite(w):
            raise MergeError(f"adapter weight {w} is not finite")


def plan_merge(checkpoint: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
               dtype: str = "auto", accumulate: str = "float32") -> MergePlan:
    """Check the options and bind every adapter key to a checkpoint tensor (before any write)."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    check_options(dtype, accumulate, weights)
    plan = build_plan(checkpoint.shapes, adapters, weights, checkpoint.tied)
    codes = {n: info.dtype for f in checkpoint.files for n, info in f.tensors.items()}
    for name in sorted(plan.targets()):
        code = codes.get(name) or codes.get(plan.untied.get(name, ""))
        if code is not None and code not in FLOAT_CODES:  # F8 (scaled/quantized), integers, bool
            raise MergeError(f"{checkpoint.root}: base tensor {name} is {code}; adapters are merged into "
                             "F16, BF16, F32 or F64 weights only (quantized or integer weights are not supported)")
    return plan


def stream_merge(
    checkpoint: Checkpoint,
    plan: MergePlan,
    writer: TensorWriter,
    *,
    dtype: str = "auto",
    accumulate: str = "float32",
    max_shard_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> MergeStats:
    """Merge `plan` into `checkpoint` tensor by tensor, handing every output tensor to `writer`.

    `dtype`: "auto" keeps each tensor's dtype, or one of float16/bfloat16/float32 for all
    floating tensors. `max_shard_bytes`: None keeps the checkpoint's sharding, else
    repacks. Raises `MergeError` naming a tensor whose result is not finite.
    """
    check_options(dtype, accumulate, [])
    layout, sources = output_layout(checkpoint, plan, dtype, max_shard_bytes)
    total_bytes = sum(t.nbytes for shard in layout for t in shard)
    writer.start(layout)
    workspace = _Workspace(ACCUMULATE[accumulate])
    done = 0
    with kernel_threads(spare_one_core()):
        for shard in layout:
            for planned in shard:
                src_file, src_name = sources[planned.name]
                info = src_file.tensors[src_name]
                ops = plan.ops.get(planned.name, [])
                if not ops and planned.dtype == info.dtype and src_name == planned.name:
                    writer.copy(planned, src_file, src_name)
                else:
                    writer.write(planned, workspace.merge(src_file, src_name, ops, planned))
                done += planned.nbytes
                if progress:
                    progress(done, total_bytes, planned.name)
    return MergeStats(
        tensors_total=sum(len(s) for s in layout),
        tensors_merged=len(plan.ops),
        keys_used=plan.keys_used,
        dtype=dtype,
        accumulate=accumulate,
        shards=len(layout),
        bytes_written=total_bytes,
        untied=plan.untied,
        tensors_changed=workspace.changed,
        max_abs_delta=workspace.max_delta,
        max_abs_delta_tensor=workspace.max_delta_name,
        dtypes=sorted({FLOAT_NAMES[t.dtype] for s in layout for t in s if t.dtype in FLOAT_NAMES}),
    )


class _Workspace:
    """Buffers reused from tensor to tensor of a streaming merge.

    Fresh memory costs a page fault per page (about as much as the merge arithmetic on
    these machines), so the float32 working copy and the cast outputs live in buffers
    that only grow. A footprint merge (dtype kept) reads the base tensor straight into
    its output buffer (positioned reads: no fault per page of the file) and rewrites only
    the footprint's regions, widened into compact buffers (a full-size working copy only
    where regions overlap); any other merge reads the base in place through a short-lived
    memory map. The cast output alternates between two buffers, so the tensor handed to the
    writer stays intact while the next one is merged (a writer may hash it in the
    background meanwhile). A third output-dtype buffer holds `W' - W` as stored, whose
    ends give the finiteness check and the summary's max |dW|. Peak: working copy + three
    outputs + the mapped tensor, i.e. at most 6x the largest merged tensor in bf16.
    """

    def __init__(self, accumulate: torch.dtype):
        self._work = torch.empty(0, dtype=accumulate)
        self._outs = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._turn = 0
        self._diff = torch.empty(0, dtype=torch.uint8)
        self._scratch = torch.empty(0, dtype=accumulate)  # a footprint's base values, widened, compact
        self.changed, self.max_delta, self.max_delta_name = 0, 0.0, None

    @staticmethod
    def _grow(buf: torch.Tensor, numel: int) -> torch.Tensor:
        return buf if buf.numel() >= numel else torch.empty(numel, dtype=buf.dtype)

    def merge(self, src: SafetensorsFile, src_name: str, ops: Sequence[tuple[DeltaOp, float]],
              planned: PlannedTensor) -> torch.Tensor:
        """Read, merge and cast one tensor; the result is valid until the next call.

        When every op declares a footprint and the dtype is kept, only the footprint goes
        through the float32 working copy (`_merge_footprint`): MoRA type 6 touches about
        r_hat/in of a tensor, and widening then rounding back the rest changes no byte.
        """
        info = src.tensors[src_name]
        out_dtype = torch_dtype(planned.dtype)
        out_bytes = info.numel * out_dtype.itemsize
        self._turn ^= 1
        self._outs[self._turn] = buf = self._grow(self._outs[self._turn], out_bytes)
        out = buf[:out_bytes].view(out_dtype).view(info.shape)
        if ops and out_dtype == torch_dtype(info.dtype) and not needs_base(ops) and footprint(ops) is not None:
            src.read_into(src_name, memoryview(buf.numpy())[:out_bytes])
            delta = self._merge_footprint(out, ops, planned.name)
        else:
            with src.mapped(src_name) as raw:
                if not ops:
                    out.copy_(raw)
                    return out
                self._work = self._grow(self._work, info.numel)
                w = self._work[: info.numel].view(info.shape)
                w.copy_(raw)
                apply_ops(w, ops, raw if needs_base(ops) else None)
                delta = self._cast_measured(w, raw, out, planned.name)
                del raw
        if delta > 0:
            self.changed += 1
        if delta > self.max_delta:
            self.max_delta, self.max_delta_name = delta, planned.name
        return out

    def _merge_footprint(self, out: torch.Tensor, ops: Sequence[tuple[DeltaOp, float]], name: str) -> float:
        """`out <- out + sum dW` when `out` holds the base tensor, every op declares a footprint
        and the dtype is kept: only the footprint's regions are widened (to the accumulation
        dtype), added to and cast back once; the rest stays the base's own bytes, which is
        what widening and rounding back would give. Returns max |dW| applied (in the
        accumulation dtype, over the regions).

        Each region is one strided view, so every step is one torch op per region (MoRA
        type 6: one region per period for all its whole diagonal blocks) and one sync per
        tensor. The regions' base values are widened into a compact buffer `base`; the sums
        are accumulated in a second compact buffer when no two regions overlap (small,
        contiguous, cache-resident), else in views of a full-size working tensor, so that
        overlapping regions add into the same elements. Every region is measured against
        the base before any is written back. A non-finite base value anywhere in `out`
        is refused, as a full cast would."""
        footprints = [op.footprint() or () for op, _ in ops]
        regions = [region for mine in footprints for region in mine]
        stored = [region.view(out) for region in regions]
        sizes = [region.numel for region in regions]
        total = sum(sizes)
        compact = disjoint(tuple(regions))
        self._scratch = self._grow(self._scratch, total)
        base = self._scratch[:total]
        bases = [b.view(s.shape) for b, s in zip(base.split(sizes), stored)]
        for b, s in zip(bases, stored):
            b.copy_(s)
        if compact:
            self._work = self._grow(self._work, total)
            work = self._work[:total]
            wides = [x.view(s.shape) for x, s in zip(work.split(sizes), stored)]
            work.copy_(base)
        else:
            self._work = self._grow(self._work, out.numel())
            w = self._work[: out.numel()].view(out.shape)
            wides = [region.view(w) for region in regions]
            for x, b in zip(wides, bases):
                x.copy_(b)
        first = 0
        for (op, weight), mine in zip(ops, footprints):
            op.add_into_regions(wides[first: first + len(mine)], weight)
            first += len(mine)
        if compact:
            torch.sub(work, base, out=base)
        else:
            for x, b in zip(wides, bases):
                torch.sub(x, b, out=b)
        lo, hi = torch.aminmax(base) if total else (torch.zeros(()), torch.zeros(()))
        for x, s in zip(wides, stored):
            s.copy_(x)
        check_finite(out, name)  # the base's values outside the regions too, as a full cast would
        return max(-float(lo), float(hi))

    def _cast_measured(self, w: torch.Tensor, raw: torch.Tensor, out: torch.Tensor, name: str) -> float:
        """`out <- w` (cast once), refusing a non-finite result (`MergeError`), and max |W' - W|
        as stored (output dtype): the dW applied.

        Its ends replace the finiteness check of `out`: with a finite base, `out - raw` is
        finite exactly when `out` is (a non-finite base entry makes both non-finite). Whole-
        tensor ops in one dtype (mixed-dtype arithmetic is ~5x slower here, and chunking
        costs a thread synchronisation per op): one extra pass over the tensor."""
        out.copy_(w)
        if out.numel() == 0:
            return 0.0
        nbytes = out.numel() * out.element_size()
        self._diff = buf = self._grow(self._diff, nbytes)
        diff = buf[:nbytes].view(out.dtype).view(out.shape)
        if raw.dtype != out.dtype:  # --dtype changes it: compare with the base in the output dtype
            diff.copy_(raw)
            raw = diff
        torch.sub(out, raw, out=diff)
        lo, hi = (float(x) for x in torch.aminmax(diff))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise not_finite(name, out.dtype)
        return max(-lo, hi)


def output_layout(checkpoint: Checkpoint, plan: MergePlan, dtype: str, max_shard_bytes: int | None
                  ) -> tuple[list[list[PlannedTensor]], dict[str, tuple[SafetensorsFile, str]]]:
    """Output shards (lists of planned tensors) and, per output name, its source tensor."""
    target = dtype_code(DTYPES[dtype]) if dtype != "auto" else None
    sources: dict[str, tuple[SafetensorsFile, str]] = {}
    shards: list[list[PlannedTensor]] = []
    for f in checkpoint.files:
        shard: list[PlannedTensor] = []
        for name, info in f.tensors.items():
            code = target if target and info.dtype in FLOAT_CODES else info.dtype
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
