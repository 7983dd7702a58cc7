"""The digest forms the store writes and compares: `sha256:<64 hex>` names, canonical JSON
(the one form that is stored and hashed), and the content digests of versions and artifacts.

No I/O here: hashing files is `registry.copying` (one read, possibly while copying), the
per-file cache is `registry.file_digests`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from registry.errors import RegistryError

PREFIX = "sha256:"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): what is stored, and what digests are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_name(hexdigest: str) -> str:
    """`sha256:<hex>`: the name a content digest is stored and shown under."""
    return PREFIX + hexdigest


def sha256_text(text: str) -> str:
    """`sha256:<hex>` of a string's UTF-8 bytes."""
    return sha256_name(hashlib.sha256(text.encode("utf-8")).hexdigest())


def is_digest(value: object) -> bool:
    """True for a well-formed `sha256:` + 64 lowercase hex digits."""
    return isinstance(value, str) and value.startswith(PREFIX) and bool(_HEX64.match(value[len(PREFIX):]))


def hex_of(digest: str) -> str:
    """The 64 hex digits of a well-formed digest (a blob's file name); RegistryError otherwise.

    The check keeps a forged digest from naming a path outside the blob directory.
    """
    if not is_digest(digest):
        raise RegistryError(f"malformed digest {digest!r} (expected sha256: and 64 hex digits)")
    return digest[len(PREFIX):]


def manifest_digest(files: dict[str, str]) -> str:
    """A version's digest: over its {path: blob digest} map only (content, no metadata)."""
    return sha256_text(canonical({"files": files}))


def artifact_digest(kind: str, files: dict[str, str]) -> str:
    """An artifact's digest: over its kind and {relative path: file digest} map."""
    return sha256_text(canonical({"kind": kind, "files": files}))
