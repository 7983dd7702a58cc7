"""`exporters.direct_writes.AppendFile`: the bytes on disk are exactly the bytes appended
(copied from memory or read from another file), whether written with O_DIRECT or through
the page cache, the file has its true size (no O_DIRECT padding left), the digest is the
sha256 of the file as read back, and a failed write is raised instead of hanging."""

from __future__ import annotations

import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from exporters import direct_writes
from exporters.direct_writes import ALIGN, AppendFile, StagingPool


@pytest.fixture
def threads():
    io = ThreadPoolExecutor(1)
    hasher = ThreadPoolExecutor(1)
    yield io, hasher
    io.shutdown()
    hasher.shutdown()


def _direct_supported(folder) -> bool:
    if not direct_writes.O_DIRECT:
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | direct_writes.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True


def _write(path, source, pool, io, hasher) -> tuple[AppendFile, bytes]:
    """Appends of odd sizes from memory and from `source`, across many staging buffers."""
    src = source.read_bytes()
    want = bytearray()
    f = AppendFile(path, pool, io, hasher)
    with open(source, "rb") as fh:
        for i in range(40):
            chunk = bytes((i * 7 + k) % 251 for k in range(1 + i * 613 % 5000))
            f.append(chunk)
            want += chunk
            off, n = (i * 3001) % 20000, (i * 4099) % 9000
            f.append_from(fh.fileno(), off, n)
            want += src[off: off + n]
    f.finish()
    f.sync_and_close()
    return f, bytes(want)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page_cache"])
def test_append_file_writes_exactly_what_it_was_given(tmp_path, threads, monkeypatch, direct):
    if direct and not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT (the page-cache case covers the fallback)")
    if not direct:
        monkeypatch.setattr(direct_writes, "O_DIRECT", 0)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(30000))
    pool = StagingPool(count=2, size=2 * ALIGN)  # small buffers: dozens of hand-overs, buffers reused
    f, want = _write(tmp_path / "out.bin", source, pool, *threads)
    assert f.direct is direct
    got = (tmp_path / "out.bin").read_bytes()
    assert len(want) % ALIGN  # the last buffer was partial (padded, then cut, under O_DIRECT)
    assert len(got) == len(want) == f.bytes
    assert got == want
    assert f.digest == "sha256:" + hashlib.sha256(got).hexdigest()
    pool.close()


def test_a_failed_write_is_raised_and_every_buffer_comes_back(tmp_path, threads, monkeypatch):
    real = os.pwrite
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", full_disk)
    pool = StagingPool(count=2, size=ALIGN)
    f = AppendFile(tmp_path / "out.bin", pool, *threads)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(50):
            f.append(b"x" * 1000)
        f.finish()
        f.sync_and_close()
    f.close()
    assert len(calls) < 50  # stopped early: the error came back to the caller
    taken = [pool.take(), pool.take()]  # both buffers were returned (a third take would block)
    assert len(taken) == 2


def test_a_file_refusing_o_direct_at_write_time_goes_through_the_page_cache(tmp_path, threads, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open already")
    real = os.pwrite
    refused = []

    def picky(fd, data, offset):
        if direct_writes.fcntl.fcntl(fd, direct_writes.fcntl.F_GETFL) & direct_writes.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_writes.os, "pwrite", picky)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(30000))
    pool = StagingPool(count=2, size=2 * ALIGN)
    f, want = _write(tmp_path / "out.bin", source, pool, *threads)
    assert refused == [0] and f.direct is False
    assert (tmp_path / "out.bin").read_bytes() == want
    assert f.digest == "sha256:" + hashlib.sha256(want).hexdigest()
