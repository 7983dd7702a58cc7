"""Reading safetensors one tensor at a time, and laying out headers for streamed writes.

Why not `safetensors.safe_open`: it maps the whole file for as long as it is open, and
every page a merge touches stays resident (and counted in RSS) until the file is closed,
so a merge of a 10 GB shard would look like a 10 GB process. Here a tensor is read
either through a private memory map of *just its bytes*, unmapped as soon as the caller
is done (`mapped`: no copy, RSS back down after each tensor), or with one positioned read
into fresh memory (`read`). Small files read whole (adapters) are mapped whole
(`map_all`). For writing, `encode_header` lays a file's header out up front from
`PlannedTensor`s, so a writer can stream tensors into it one at a time (the writer
itself, which hashes as it writes, is `exporters.safetensors_out`).

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {}}`,
then the data buffer; offsets are relative to the start of the buffer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mora_core.errors import AdapterError, MoraCoreError
from mora_core.safe_io import open_regular, parse_json

if TYPE_CHECKING:
    import torch

# A header larger than this is not a model file, it is an attack or corruption (the
# safetensors library's own limit). Entries: a LoRA on every expert of a large MoE has
# ~10^5 tensors in one file; 2^18 leaves room and bounds the time a header costs.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 1 << 18
MAX_DIMS = 8
MAX_NUMEL = 1 << 48  # elements of a tensor, counting empty dimensions as 1

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
        "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    }
    for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                       ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (`"BF16"` -> `torch.bfloat16`)."""
    try:
        return _torch_dtypes()[code]
    except KeyError:
        raise MoraCoreError(f"unsupported safetensors dtype {code!r}") from None


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    for code, dt in _torch_dtypes().items():
        if dt == dtype:
            return code
    raise MoraCoreError(f"dtype {dtype} cannot be stored in safetensors")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file: enough to read it, copy it, or plan an output."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """A validated safetensors header plus positioned reads of single tensors.

    Every problem in the header (truncation, absurd sizes, overlapping or out-of-file
    offsets, sizes that do not match shape x dtype) raises `error_cls` with the path in
    the message, before any tensor data is read.
    """

    def __init__(self, path: str | os.PathLike[str], error_cls: type[MoraCoreError] = AdapterError):
        self.path = Path(path)
        self._error_cls = error_cls
        try:
            with open_regular(self.path, error_cls) as fh:
                self.file_size = os.fstat(fh.fileno()).st_size
                head = fh.read(8)
                if len(head) < 8:
                    self._fail("file is shorter than a safetensors header (truncated?)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or n > self.file_size - 8:
                    self._fail(f"header claims {n} bytes but the file has {self.file_size} (corrupt or truncated)")
                raw = fh.read(n)
        except OSError as exc:
            raise error_cls(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        if raw.count(b'"data_offsets"') > MAX_TENSORS:
            self._fail(f"header lists more than {MAX_TENSORS} tensors; refused")
        header = parse_json(raw, self.path, error_cls, max_depth=4, part="header")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self._fail("__metadata__ is not a map of strings")
        self.metadata: dict[str, str] = metadata
        data_start = 8 + n
        infos: list[TensorInfo] = []
        for name, entry in header.items():
            infos.append(self._parse_entry(name, entry, data_start))
        infos.sort(key=lambda t: t.begin)
        pos = data_start
        for info in infos:
            if info.begin < pos:
                self._fail(f"tensor {info.name!r} overlaps another tensor")
            pos = max(pos, info.end)
        if pos > self.file_size:
            self._fail(f"data ends at byte {pos} but the file has {self.file_size} (truncated)")
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}

    def _fail(self, what: str):
        raise self._error_cls(f"{self.path}: {what}")

    def _parse_entry(self, name: str, entry: Any, data_start: int) -> TensorInfo:
        """One header entry, checked for type, shape and size before anything trusts it."""
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            self._fail(f"tensor {name[:80]!r} has a malformed header entry")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in DTYPE_SIZES:
            self._fail(f"tensor {name[:80]!r} has unsupported dtype {str(code)[:20]!r}")
        if (not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(v) is int for v in (*shape, *offsets))):
            self._fail(f"tensor {name[:80]!r}: shape and data_offsets must be lists of integers")
        if len(shape) > MAX_DIMS or any(d < 0 for d in shape) or math.prod(max(d, 1) for d in shape) > MAX_NUMEL:
            self._fail(f"tensor {name[:80]!r} has an impossible shape ({len(shape)} dimensions, "
                       f"{str(shape)[:60]})")
        b, e = offsets
        if b < 0 or e < b:
            self._fail(f"tensor {name[:80]!r} has negative sizes or offsets")
        if math.prod(shape) * DTYPE_SIZES[code] != e - b:
            self._fail(f"tensor {name[:80]!r}: shape {shape} x {code} does not match its {e - b} bytes")
        return TensorInfo(name, code, tuple(shape), data_start + b, data_start + e)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh, owned memory (one positioned read, no mmap)."""
        import torch

        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self.read_into(name, memoryview(buf.numpy()))
        return buf.view(torch_dtype(info.dtype)).reshape(info.shape)

    def read_into(self, name: str, buf: memoryview) -> None:
        """Read one tensor's bytes into `buf`, a writable byte buffer of exactly its size.

        Positioned reads (the kernel copies from the page cache): no map, so no page faults
        on the file's pages, and no fresh memory when the caller reuses `buf`.
        """
        info = self.tensors[name]
        if buf.nbytes != info.nbytes:
            raise ValueError(f"{name}: a buffer of {buf.nbytes} bytes for {info.nbytes}")
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        with open(self.path, "rb", buffering=0) as fh:
            got = 0
            while got < info.nbytes:
                k = os.preadv(fh.fileno(), [view[got:]], info.begin + got)
                if not k:
                    self._fail(f"tensor {name!r} is truncated")
                got += k

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor in fresh, owned memory (for files loaded whole, e.g. small models)."""
        return {n: self.read(n) for n in self.tensors}

    @contextlib.contextmanager
    def mapped(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor as a view of a private memory map of just its bytes, unmapped on exit.

        Reading through it costs no copy (the page cache is read in place), and the pages
        leave the process's RSS when the block ends, so a streaming merge stays at one
        tensor. The caller must not keep the tensor (or views of it) past the block.
        """
        import mmap

        import torch

        info = self.tensors[name]
        if info.nbytes == 0:
            yield torch.empty(info.shape, dtype=torch_dtype(info.dtype))
            return
        start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), info.end - start, offset=start, access=mmap.ACCESS_COPY)
        tensor = _view_in_map(mm, info, start)
        try:
            yield tensor
        finally:
            del tensor
            with contextlib.suppress(BufferError):  # a view escaped: unmapped when collected
                mm.close()

    def map_all(self) -> dict[str, torch.Tensor]:
        """Every tensor as a view of one private (copy-on-write) memory map of the file.

        For small files read whole (adapters): no copy, and pages are shared with the
        page cache. Not for base models, whose pages would accumulate in RSS.
        """
        import mmap

        import torch

        if not self.tensors:
            return {}
        with open(self.path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return {name: _view_in_map(mm, info, 0) if info.nbytes else
                torch.empty(info.shape, dtype=torch_dtype(info.dtype))
                for name, info in self.tensors.items()}


def _view_in_map(mm: Any, info: TensorInfo, map_start: int) -> torch.Tensor:
    """The tensor `info` describes, as a view of `mm` (a map of the file from `map_start`).

    Copied instead when a non-standard writer left it unaligned for its dtype.
    """
    import torch

    raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.begin - map_start)
    if info.begin % DTYPE_SIZES[info.dtype]:
        raw = raw.clone()
    return raw.view(torch_dtype(info.dtype)).reshape(info.shape)


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def _alignment_padding(header_len: int) -> int:
    # Like the reference writer: pad the JSON with spaces so the data starts 8-aligned.
    return (8 - (8 + header_len) % 8) % 8


def encode_header(tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out back to back, in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * _alignment_padding(len(raw))
    return struct.pack("<Q", len(raw)) + raw


def all_finite(t: torch.Tensor) -> bool:
    """True if no element is NaN or Inf.

    `aminmax` in the tensor's own dtype: NaN propagates to both ends and an infinity is
    an end, so two finite ends prove every element finite; it is one read of the tensor,
    where `isfinite(t).all()` materialises a boolean tensor (~30x slower on bf16 here).
    """
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
