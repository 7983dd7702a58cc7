"""Reading files someone else handed over: regular files only, bounded sizes, one JSON reader.

Every file the tool reads from a user's folder (adapter configs, safetensors headers,
base configs, shard indexes, `export.json`) may be hostile. Two rules live here, so
that every reader applies them the same way:

- `open_regular`: the file is opened without blocking (`O_NONBLOCK`, so a FIFO or a
  device cannot hang the process) and refused unless the *opened* descriptor is a
  regular file (checked with `fstat`, so no swap between a check and the open).
- `parse_json` / `read_json`: the one JSON reader. Strict RFC 8259 JSON: no `NaN` or
  `Infinity`, no duplicate keys in an object (Python would keep the last one silently;
  the safetensors library refuses duplicate tensor names), at most `MAX_DEPTH` levels of
  nesting, numbers whose text is at most `MAX_NUMBER_DIGITS` long, a size cap per file.
  Whatever is wrong becomes one `error_cls` line naming the file, never a traceback
  (`RecursionError`, `ValueError` of an over-long integer, `UnicodeDecodeError`).

The folder rule (which names of a folder may be read at all: no symbolic link leaving
the folder) is `mora_core.checkpoint.member`; it calls `open_regular`'s check too.
No torch import here.
"""

from __future__ import annotations

import json
import os
import re
import stat
from itertools import accumulate
from pathlib import Path
from typing import IO, Any

from mora_core.errors import MoraCoreError

MAX_JSON_BYTES = 16 << 20  # config, index and recipe files; safetensors headers have their own cap
MAX_DEPTH = 64  # real configs nest < 10 levels
MAX_NUMBER_DIGITS = 400  # float64 needs < 30 significant digits; Python refuses ints over 4300 digits


def open_regular(path: str | os.PathLike[str], error_cls: type[Exception] = MoraCoreError) -> IO[bytes]:
    """Open `path` for reading (binary, unbuffered) if it is a regular file, else `error_cls`.

    The open never blocks (a FIFO named like a config file would otherwise hang the
    process forever) and the check is made on the opened descriptor.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error_cls(f"{path}: not found") from None
    except OSError as exc:
        raise error_cls(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error_cls(f"{path}: not a regular file ({_kind(mode)}); refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def read_capped(path: str | os.PathLike[str], cap: int, error_cls: type[Exception] = MoraCoreError,
                what: str = "file") -> bytes:
    """The bytes of a regular file of at most `cap` bytes (read once, at most cap + 1)."""
    with open_regular(path, error_cls) as fh:
        chunks, got = [], 0
        while got <= cap:
            chunk = fh.read(cap + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    if got > cap:
        raise error_cls(f"{path}: larger than {_size(cap)}; not a {what}")
    return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


class _Refused(ValueError):
    """Raised inside the JSON decoder's hooks; becomes the caller's error class."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON value")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"key {k[:80]!r} appears twice in one object")
            seen.add(k)
    return out


def _number(kind: type) -> Any:
    def convert(text: str) -> Any:
        if len(text) > MAX_NUMBER_DIGITS:
            raise _Refused(f"a number of {len(text)} characters")
        return kind(text)
    return convert


_DECODER = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constant,
                            parse_int=_number(int), parse_float=_number(float))


def parse_json(raw: bytes | str, where: str | os.PathLike[str], error_cls: type[Exception] = MoraCoreError,
               max_depth: int = MAX_DEPTH, part: str = "") -> Any:
    """Decode one strict JSON document (see the module docstring); `error_cls` naming `where`.

    `part` names the JSON part of a larger file ("header": `<file>: header is not valid JSON`).
    """
    where = f"{where}: {part}" if part else f"{where}:"
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise error_cls(f"{where} is not valid JSON (not UTF-8 text)") from None
    if _depth_exceeds(text, max_depth):
        raise error_cls(f"{where} is not valid JSON here (nested deeper than {max_depth} levels)")
    try:
        return _DECODER.decode(text)
    except _Refused as exc:
        raise error_cls(f"{where} is not valid JSON here ({exc})") from None
    except json.JSONDecodeError as exc:
        raise error_cls(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise error_cls(f"{where} is not valid JSON ({str(exc).splitlines()[0][:100]})") from None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than `max_depth` (linear, in C loops).

    Checked before decoding: the decoder recurses once per level, so a document nested
    200,000 deep is refused without being decoded.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > max_depth


def read_json(path: str | os.PathLike[str], error_cls: type[Exception] = MoraCoreError,
              max_bytes: int = MAX_JSON_BYTES, what: str = "JSON file") -> Any:
    """`parse_json` of a regular file of at most `max_bytes` (`error_cls` naming `path`)."""
    return parse_json(read_capped(Path(path), max_bytes, error_cls, what), path, error_cls)
