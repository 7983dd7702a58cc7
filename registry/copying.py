"""Copy while hashing, and hash: every byte of a file is read from storage once, through a
bounded buffer.

`copy_hashing` copies an open source to an open destination and returns its sha256;
`hash_file` hashes a file; `hash_range` hashes a byte range of an open file into a running
hash (the safetensors writer's raw copies). All three read with `readinto` into buffers of
BUFFER bytes that are reused from read to read, never through a memory map of the whole
file: every page of a map counts in the process's RSS until it is unmapped, so hashing a
10 GB ONNX weights file that way looked like 10 GB of memory. Used by the blob store (push,
pull, verify), the file digest cache and the exporters; nothing here knows about the
database.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from registry.digests import sha256_name
from registry.faults import fault_point

# Bytes per read. A hash running in a thread beside a busy Python thread (a merge importing
# torch) takes the GIL back after every read and every update, and may wait up to the
# interpreter's switch interval (5 ms) each time: at 1 MiB per hand-off that caps it near
# 200 MB/s, at 8 MiB it outruns sha256 itself. Two buffers at most are alive per copy.
BUFFER = 8 * 1024 * 1024
CHUNK = BUFFER  # the name other modules import
SYNC_EVERY = 128 * 1024 * 1024
Progress = Callable[[int], None]  # called with the number of bytes just processed


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename into it survives a power cut (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """(digest, size) of a file: one sequential read through one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on big buffers
            total += n
            if progress:
                progress(n)
    return sha256_name(h.hexdigest()), total


def hash_range(h: Any, fd: int, offset: int, count: int, buf: bytearray | None = None) -> None:
    """Feed `count` bytes of the open file `fd` from `offset` into the running hash `h`, with
    positioned reads into `buf` (BUFFER bytes if None). OSError if the file ends early."""
    buf = buf if buf is not None else bytearray(min(BUFFER, max(count, 1)))
    view = memoryview(buf)
    done = 0
    while done < count:
        n = os.preadv(fd, [view[: min(len(buf), count - done)]], offset + done)
        if n == 0:
            raise OSError(f"unexpected end of file hashing {count} bytes at offset {offset}")
        h.update(view[:n])
        done += n


def copy_hashing(src, dst, progress: Progress | None, sync: bool = False) -> tuple[str, int]:
    """Copy src -> dst (open binary files) and return (digest, size), reading the source once.

    Three things overlap: the calling thread reads the next buffer and writes, one worker
    hashes the buffer just read, another flushes what is already written (fdatasync every
    SYNC_EVERY bytes) so that dirty pages never pile up into write throttling. Two buffers
    alternate: one is hashed and written while the other is filled. With `sync`, dst is
    fsynced before returning, the last flush overlapping the last hash.
    """
    h = hashlib.sha256()
    bufs = [bytearray(BUFFER), bytearray(BUFFER)]
    turn = 0
    total = synced = 0
    hashing: Future | None = None
    flushing: Future | None = None
    size = os.fstat(src.fileno()).st_size
    with ThreadPoolExecutor(2, thread_name_prefix="copy-hash") as pool:
        try:
            while True:
                view = memoryview(bufs[turn])
                n = src.readinto(view)
                if hashing is not None:
                    hashing.result()  # hashes stay in order; the other buffer is free again
                    hashing = None
                if not n:
                    break
                chunk = view[:n]
                hashing = pool.submit(h.update, chunk)
                _write_all(dst, chunk)
                total += n
                turn ^= 1
                if progress:
                    progress(n)
                if total - synced >= SYNC_EVERY and (flushing is None or flushing.done()):
                    if flushing is not None:
                        flushing.result()
                    flushing = pool.submit(os.fdatasync, dst.fileno())
                    synced = total
                if total < size:
                    fault_point("copying")
            if flushing is not None:
                flushing.result()
                flushing = None
            if sync:
                os.fsync(dst.fileno())
        finally:
            for job in (hashing, flushing):  # never leave a worker on a buffer being dropped
                if job is not None:
                    with contextlib.suppress(Exception):
                        job.result()
    return sha256_name(h.hexdigest()), total


def _write_all(dst, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += dst.write(view[done:])
