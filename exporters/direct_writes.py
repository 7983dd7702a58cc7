"""New files written front to back through reused staging buffers, with `O_DIRECT` where
the file system takes it, hashed as written.

Why: on these machines a fresh page costs a fault in the hypervisor, and a buffered write
of a new file takes one fresh page-cache page per 4 KiB; writing a merged 0.9 GiB model
through the page cache measured 0.3-2.2 s of system time (same bytes, varying with the
host), plus its fsync. With `O_DIRECT` the disk reads the bytes from the process's own
staging buffers (always the same pages): the same 0.9 GiB took 0.03-0.04 s of CPU and
0.4-0.5 s of wall time, and its fsync then only has metadata left (0.01 s). Measured with
`bench/bench_merge_folder.py`'s base on ext4; see bench/README.md.

`StagingPool` holds a few page-aligned buffers (anonymous maps) shared by all the files
of one output. `AppendFile` fills one buffer with what it is given (bytes copied from
memory, or read from a source file with positioned reads), and when it is full hands it
to two one-thread pools: the hash thread feeds it to the file's running sha256 (buffers
arrive in order), the I/O thread writes it at its offset; the caller meanwhile fills the
next buffer. A buffer goes back to the pool when both are done. The last, partial buffer
is padded to the alignment for `O_DIRECT` and the file truncated to its true size
afterwards. Where `O_DIRECT` is refused (no such flag, the open or a write answers
EINVAL: tmpfs on older kernels, odd block sizes) the same buffers are written through
the page cache instead; the bytes, the digest and the durability (`sync_and_close`
fsyncs either way) are the same.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of this (>= any logical block)
STAGING_BYTES = 16 << 20  # one staging buffer
STAGING_COUNT = 4  # two being written/hashed, one being filled, one spare: 64 MiB in all
O_DIRECT = getattr(os, "O_DIRECT", 0)


class StagingPool:
    """Page-aligned, reused staging buffers; `take` blocks until one is free."""

    def __init__(self, count: int = STAGING_COUNT, size: int = STAGING_BYTES):
        if size % ALIGN or count < 1:
            raise ValueError(f"staging buffers of {size} bytes x {count}: need a multiple of {ALIGN}, at least one")
        self.size = size
        self._all = [mmap.mmap(-1, size) for _ in range(count)]
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for buf in self._all:
            self._free.put(buf)

    def take(self) -> mmap.mmap:
        return self._free.get()

    def give(self, buf: mmap.mmap) -> None:
        self._free.put(buf)

    def close(self) -> None:
        """Unmap the buffers (call once nothing is in flight)."""
        for buf in self._all:
            with contextlib.suppress(BufferError):
                buf.close()


class AppendFile:
    """A new file (created exclusively, mode 0644) written front to back; see the module docstring.

    `append(data)` copies bytes; `append_from(fd, offset, count)` reads them from an open
    file. `finish()` hands over the last buffer. `sync_and_close()` waits for the hashing and
    the writes, sets `digest` with a `hasher` (the sha256 of exactly the bytes written) and
    the true size, fsyncs and closes. Errors of the threads are raised by the next call.
    """

    def __init__(self, path: Path, pool: StagingPool, io: ThreadPoolExecutor, hasher: ThreadPoolExecutor | None):
        self.path = Path(path)
        self._pool, self._io, self._hasher = pool, io, hasher
        self._h = hashlib.sha256() if hasher is not None else None
        self._fd = -1
        self.direct = bool(O_DIRECT)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        if self.direct:
            try:
                self._fd = os.open(self.path, flags | O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        self._buf: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._fill = 0
        self._offset = 0  # file offset of the current buffer's first byte
        self._jobs: list[Future] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.digest: str | None = None
        self.bytes = 0

    # ------------------------------------------------------------------ filling

    def _room(self) -> memoryview:
        """The free part of the current buffer (taking one from the pool if none)."""
        self._raise_error()
        if self._buf is None:
            self._buf = self._pool.take()
            self._view = memoryview(self._buf)
        return self._view[self._fill:]

    def append(self, data: memoryview | bytes) -> None:
        """Append a copy of `data` (any contiguous bytes-like object)."""
        src = memoryview(data).cast("B")
        while len(src):
            room = self._room()
            n = min(len(room), len(src))
            room[:n] = src[:n]
            self._filled(n)
            src = src[n:]

    def append_from(self, fd: int, offset: int, count: int) -> None:
        """Append `count` bytes of the open file `fd` from `offset` (positioned reads)."""
        done = 0
        while done < count:
            room = self._room()
            n = os.preadv(fd, [room[: min(len(room), count - done)]], offset + done)
            if n == 0:
                raise OSError(f"unexpected end of file copying {count} bytes at offset {offset}")
            self._filled(n)
            done += n

    def _filled(self, n: int) -> None:
        self._fill += n
        self.bytes += n
        if self._fill == self._pool.size:
            self._hand_over()

    def _hand_over(self) -> None:
        """Hash and write the current buffer in the threads; it returns to the pool after both."""
        buf, view, n, offset = self._buf, self._view, self._fill, self._offset
        self._buf = self._view = None
        self._fill = 0
        self._offset += n
        if buf is None:
            return
        length = n
        if self.direct and n % ALIGN:  # only the last buffer of a file is partial
            length = n + ALIGN - n % ALIGN
            view[n:length] = bytes(length - n)
        jobs = []
        if self._h is not None:
            jobs.append(self._hasher.submit(self._h.update, view[:n]))
        jobs.append(self._io.submit(self._write, view[:length], offset))
        left = [len(jobs)]

        def done(job: Future) -> None:
            with self._lock:
                if job.exception() is not None and self._error is None:
                    self._error = job.exception()
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._pool.give(buf)

        self._jobs += jobs
        for job in jobs:
            job.add_done_callback(done)

    def _write(self, view: memoryview, offset: int) -> None:
        """In the I/O thread: write all of `view` at `offset` (O_DIRECT refused: page cache)."""
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], offset + done)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~O_DIRECT)
                self.direct = False

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ ending

    def _wait(self) -> None:
        for job in self._jobs:
            job.result()

    def finish(self) -> None:
        """Hand over the last buffer; nothing is waited for (the caller goes on with the next
        file while this one's last buffers are hashed and written: `sync_and_close` waits for
        them and sets `digest`)."""
        self._hand_over()
        self._raise_error()

    def sync_and_close(self) -> None:
        """Wait for the hashing and the writes, set `digest`, cut the O_DIRECT padding, fsync
        and close (worker-thread safe)."""
        try:
            self._wait()
            self._raise_error()
            if self._h is not None:
                self.digest = "sha256:" + self._h.hexdigest()
            if os.fstat(self._fd).st_size != self.bytes:
                os.ftruncate(self._fd, self.bytes)
            os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        """Give the current buffer back, wait for the threads, close the file (idempotent)."""
        if self._buf is not None:
            self._pool.give(self._buf)
            self._buf = self._view = None
        for job in self._jobs:
            with contextlib.suppress(BaseException):
                job.result()
        self._jobs = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
