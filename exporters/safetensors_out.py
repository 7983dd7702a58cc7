"""Merged safetensors folders: the tensor writer of a streaming merge, and `merge_folder`.

`SafetensorsFolderWriter` is the `mora_core.merge.TensorWriter` for a folder of shards:
it names the shards (`model.safetensors`, or `model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json`), writes each from a header laid out up front, and
*hashes every byte as it writes it*: the sha256 of each file is known when the file is
closed, so registering the output never reads it again. The bytes go through reused
staging buffers (`exporters.direct_writes`): one worker thread hashes each full buffer
(hashlib releases the GIL), another writes it (`O_DIRECT` where the file system takes it:
no fresh page-cache pages, and the fsync finds the data on disk already), and a third
fsyncs shard k while shard k+1 is being produced.

`merge_folder` is the whole safetensors output: open the checkpoint (once), plan, stream
the merge into the writer inside `exporters.outputs.staged_output`, copy the side files
with the config edits the merge implies, and report (digests of every file included).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exporters.direct_writes import AppendFile, StagingPool
from exporters.outputs import copy_side_files, refuse_existing, staged_output, write_json
from mora_core.adapter import Adapter
from mora_core.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, open_checkpoint
from mora_core.merge import ProgressFn, plan_merge, stream_merge
from mora_core.safetensors_io import PlannedTensor, SafetensorsFile, dtype_code, encode_header

SHARD_METADATA = {"format": "pt"}
FinishFn = Callable[[Path, dict[str, Any]], dict[str, str]]  # (staged folder, report) -> files it added


def shard_names(n: int) -> list[str]:
    """The Hugging Face names of `n` shards."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class HashingShardWriter:
    """One safetensors file with a fixed layout, written tensor by tensor and hashed as written.

    Tensors must arrive in the planned order with the planned dtype and shape. The bytes go
    through an `exporters.direct_writes.AppendFile`: copied (merged tensors) or read from
    the source file (raw copies) into staging buffers, which the I/O thread writes with
    `O_DIRECT` where the file system takes it and, with a `hasher`, the hash thread feeds to
    the file's sha256 while the caller goes on. `digest` is set by `sync_and_close()`: the
    sha256 of exactly the bytes written. A tensor is copied before `write` returns, so the caller may
    reuse its memory at once. Without a hasher nothing is hashed.
    """

    def __init__(self, path: Path, plan: Sequence[PlannedTensor], hasher: ThreadPoolExecutor | None,
                 metadata: dict[str, str] | None = None, *, pool: StagingPool, io: ThreadPoolExecutor):
        self.path = Path(path)
        self._plan = list(plan)
        self._next = 0
        self._file = AppendFile(self.path, pool, io, hasher)
        self._file.append(encode_header(self._plan, metadata))

    @property
    def digest(self) -> str | None:
        return self._file.digest

    @property
    def bytes(self) -> int:
        return self._file.bytes

    def _expect(self, name: str) -> PlannedTensor:
        if self._next >= len(self._plan) or self._plan[self._next].name != name:
            want = self._plan[self._next].name if self._next < len(self._plan) else "(end of file)"
            raise RuntimeError(f"writer for {self.path} expected {want!r}, got {name!r}")
        self._next += 1
        return self._plan[self._next - 1]

    def write(self, planned: PlannedTensor, tensor) -> None:
        """Append a tensor (any torch tensor of the planned dtype and shape)."""
        import torch

        got = self._expect(planned.name)
        if dtype_code(tensor.dtype) != got.dtype or tuple(tensor.shape) != got.shape:
            raise RuntimeError(f"{got.name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                               f"planned {got.dtype} {got.shape}")
        if got.nbytes:
            self._file.append(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def copy(self, planned: PlannedTensor, source: SafetensorsFile, name: str) -> None:
        """Append a tensor's bytes unchanged from `source` (positioned reads of the source file)."""
        got = self._expect(planned.name)
        info = source.tensors[name]
        if info.nbytes != got.nbytes or info.dtype != got.dtype:
            raise RuntimeError(f"{got.name}: raw copy of {info.dtype} into planned {got.dtype}")
        if not info.nbytes:
            return
        fd = os.open(source.path, os.O_RDONLY)
        try:
            self._file.append_from(fd, info.begin, info.nbytes)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Check every planned tensor arrived and hand over the last bytes (`sync_and_close`
        waits for them, sets `digest` and fsyncs)."""
        if self._next != len(self._plan):
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self._plan)} tensors written")
        self._file.finish()

    def sync_and_close(self) -> None:
        """Wait for the writes, fsync and close (safe in a worker thread)."""
        self._file.sync_and_close()

    def close(self) -> None:
        self._file.close()


class SafetensorsFolderWriter:
    """A `TensorWriter` that writes shards (and the index) into `folder`, hashing every file
    (unless `digests=False`: nothing is hashed and `files` stays empty).

    After `finish()`, `files` maps each written file name to its `sha256:<hex>` digest and
    `weight_map` each tensor to its shard. Use as a context manager: an exception closes
    every file (the caller removes the folder).
    """

    def __init__(self, folder: Path, metadata: dict[str, str] | None = None, digests: bool = True):
        self.folder = Path(folder)
        self.metadata = dict(SHARD_METADATA if metadata is None else metadata)
        self.files: dict[str, str] = {}
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="shard-hash") if digests else None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="shard-write")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="shard-fsync")
        self._pool = StagingPool()
        self._syncs: list[tuple[HashingShardWriter, Future]] = []
        self._layout: list[list[PlannedTensor]] = []
        self._names: list[str] = []
        self._shard = -1
        self._left = 0
        self._current: HashingShardWriter | None = None

    def __enter__(self) -> SafetensorsFolderWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, shards: Sequence[Sequence[PlannedTensor]]) -> None:
        self._layout = [list(s) for s in shards]
        self._names = shard_names(len(self._layout))
        self.total_bytes = sum(t.nbytes for s in self._layout for t in s)
        self._advance()

    def _advance(self) -> None:
        """Close the finished shard(s) (fsync in the background) and open the next one."""
        while self._left == 0:
            if self._current is not None:  # its last bytes are hashed, written and fsynced beside the next shard
                self._current.finish()
                self._syncs.append((self._current, self._syncer.submit(self._current.sync_and_close)))
                self._current = None
            self._shard += 1
            if self._shard >= len(self._layout):
                return
            plan = self._layout[self._shard]
            self._current = HashingShardWriter(self.folder / self._names[self._shard], plan, self._hasher,
                                               self.metadata, pool=self._pool, io=self._io)
            self._left = len(plan)

    def _target(self, planned: PlannedTensor) -> HashingShardWriter:
        if self._current is None:
            raise RuntimeError(f"{planned.name}: more tensors than the layout given to start()")
        self.weight_map[planned.name] = self._current.path.name
        return self._current

    def write(self, planned: PlannedTensor, tensor) -> None:
        self._target(planned).write(planned, tensor)
        self._left -= 1
        self._advance()

    def copy(self, planned: PlannedTensor, source: SafetensorsFile, name: str) -> None:
        self._target(planned).copy(planned, source, name)
        self._left -= 1
        self._advance()

    def finish(self) -> dict[str, str]:
        """Wait for every shard's fsync, write the index when sharded; returns `files`."""
        if self._current is not None or self._shard < len(self._layout):
            raise RuntimeError(f"{self.folder}: the merge stopped before the last shard was complete")
        for shard, job in self._syncs:
            job.result()
            if shard.digest is not None:
                self.files[shard.path.name] = shard.digest
        if len(self._layout) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            digest = write_json(self.folder / INDEX_NAME, index)
            if self._hasher is not None:
                self.files[INDEX_NAME] = digest
        return dict(self.files)

    def close(self) -> None:
        """Release threads and file descriptors (idempotent; after an error, too)."""
        if self._current is not None:
            self._current.close()
        self._syncer.shutdown(wait=True)
        for shard, _ in self._syncs:
            shard.close()
        self._io.shutdown(wait=True)
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
        self._pool.close()


# ----------------------------------------------------------------------------- merge_folder


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
    digests: dict[str, str] = field(default_factory=dict)  # every output file -> sha256 (taken while written)
    tensors_changed: int = 0  # merged tensors whose values moved
    max_abs_delta: float = 0.0  # max |W' - W| applied, as stored (output dtype)
    max_abs_delta_tensor: str | None = None
    dtype_requested: str = "auto"  # `dtype` is what the output holds ("auto" resolved)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def merge_folder(
    base: str | Path | Checkpoint,
    adapters: Sequence[Adapter],
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    dtype: str = "auto",
    accumulate: str = "float32",
    max_shard_bytes: int | None = None,
    progress: ProgressFn | None = None,
    digests: bool = True,
    finish: FinishFn | None = None,
) -> MergeReport:
    """Stream-merge `adapters` into `base` (a folder, a .safetensors file or an open
    `Checkpoint`), writing a new folder `out_dir`.

    `dtype`: "auto" keeps each tensor's dtype, or one of float16/bfloat16/float32 for all
    floating tensors (recorded as `torch_dtype` in the copied config.json). An untied
    embedding pair sets `tie_word_embeddings: false`. `max_shard_bytes`: None keeps the
    base's sharding, else repacks. `digests`: the sha256 of every output file, taken while
    it is written (`MergeReport.digests`; False skips hashing, e.g. when nothing will be
    registered). `finish(folder, report)` is called in the staged folder once every
    other file is written and returns the digests of what it adds (the model card:
    `exporters.card.OutputCard`). Every adapter key is resolved and shape-checked before
    anything is written; `out_dir` appears only when complete. Raises
    `MergeError`/`AdapterError`/`ExportError` for bad input.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    refuse_existing(out)
    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    plan = plan_merge(checkpoint, adapters, weights, dtype, accumulate)
    edits: dict[str, Any] = {}
    if dtype != "auto":  # validated by plan_merge
        edits.update({"torch_dtype": dtype, "dtype": dtype})
    if plan.untied:
        edits["tie_word_embeddings"] = False
    with staged_output(out) as tmp, SafetensorsFolderWriter(tmp, digests=digests) as writer:
        stats = stream_merge(checkpoint, plan, writer, dtype=dtype, accumulate=accumulate,
                             max_shard_bytes=max_shard_bytes, progress=progress)
        files = writer.finish()
        side = copy_side_files(checkpoint.root, tmp, edits, skip=checkpoint.weight_file_names())
        if digests:
            files.update(side)
        report = MergeReport(
            output=str(out),
            tensors_total=stats.tensors_total,
            tensors_merged=stats.tensors_merged,
            keys_used=stats.keys_used,
            weights={a.label: w for a, w in zip(adapters, weights)},
            dtype=",".join(stats.dtypes) or dtype,
            accumulate=accumulate,
            shards=stats.shards,
            bytes_written=stats.bytes_written,
            seconds=0.0,
            peak_rss_mb=0.0,
            untied=stats.untied,
            tensors_changed=stats.tensors_changed,
            max_abs_delta=stats.max_abs_delta,
            max_abs_delta_tensor=stats.max_abs_delta_tensor,
            dtype_requested=dtype,
        )
        if finish is not None:  # the model card, written last: it states the merge's figures
            card = finish(tmp, report.to_dict())
            if digests:
                files.update(card)
    report.seconds = round(time.perf_counter() - start, 3)
    report.peak_rss_mb = round(peak_rss_mb(), 1)
    report.digests = dict(sorted(files.items()))
    return report
