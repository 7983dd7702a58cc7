"""File digests for recipes: `sha256:<hex>`, the same form the registry uses for blobs."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """`sha256:<hex>` of a file, one sequential read."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()
