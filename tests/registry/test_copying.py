"""registry.copying: the one file hasher. Digests are sha256 of the bytes for every size
around the buffer's edges, and hashing or copying a file holds at most a few buffers in
memory, whatever the file's size (a whole-file map counted every page in the RSS: an ONNX
export hashing its 10 GB weights file looked 10 GB bigger)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from registry.copying import BUFFER, copy_hashing, hash_file, hash_range

SIZES = (0, 1, 4097, BUFFER - 1, BUFFER, BUFFER + 1, 2 * BUFFER + 3)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", SIZES)
def test_hash_and_copy_give_the_bytes_sha256(tmp_path, size):
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    seen: list[int] = []
    assert hash_file(src, seen.append) == (_sha(data), size)
    assert sum(seen) == size
    dst = tmp_path / "dst"
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        assert copy_hashing(fin, fout, None, sync=True) == (_sha(data), size)
    assert dst.read_bytes() == data


def test_hash_range_feeds_exactly_the_range(tmp_path):
    data = os.urandom(2 * BUFFER + 100)
    src = tmp_path / "src"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        for offset, count, buf in ((0, len(data), None), (7, BUFFER + 5, bytearray(4096)), (BUFFER, 0, None)):
            h = hashlib.sha256()
            hash_range(h, fd, offset, count, buf)
            assert h.hexdigest() == hashlib.sha256(data[offset:offset + count]).hexdigest()
        with pytest.raises(OSError, match="end of file"):
            hash_range(hashlib.sha256(), fd, len(data) - 10, 20)
    finally:
        os.close(fd)


MEASURE = """
import json, sys
from pathlib import Path
from registry.copying import copy_hashing, hash_file

def hwm():  # peak RSS so far, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
before = hwm()
hash_file(src)
hashed = hwm()
with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
    copy_hashing(fin, fout, None)
print(json.dumps({"hash": hashed - before, "copy": hwm() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_memory_stays_bounded_whatever_the_file_size(tmp_path):
    size = 160 << 20  # 20 buffers: a map of the whole file would add all of it
    src = tmp_path / "big"
    with open(src, "wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            fh.write(block)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(tmp_path / "copy")],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    grown = json.loads(out.stdout)
    assert grown["hash"] < 4 * BUFFER, grown
    assert grown["copy"] < 4 * BUFFER, grown
    assert hash_file(tmp_path / "copy") == hash_file(src)
