"""The one interface every blob backend implements, and blob URLs.

A backend keeps bytes addressed by `sha256:<hex>`, written once and verified on every
read. Two implement it: `registry.blobs.BlobStore` (a directory in the home, the
default) and `registry.blob_s3.S3BlobStore` (an S3-compatible bucket, chosen with
`ADAPTERS_BLOB_URL=s3://bucket/prefix`). The registry only talks to this protocol.

A push goes through four steps so that bad input never reaches the store:

1. `stage(source)`: hash the file (a local backend also copies it into a locked temp
   file; the S3 backend starts a multipart upload of a large new blob, whose parts stay
   invisible); nothing is visible yet, so the adapter's validation overlaps this work.
2. `make_durable(staged)`: after the adapter validated, outside the database lock: the
   local backend fsyncs its temp file, the S3 backend uploads (conditional PUT) or
   completes the upload `stage` started (conditional complete).
3. `publish(staged)`: inside the write transaction: the blob is in place under its
   digest (renamed; or, remotely, still present: a `gc` may have removed an old
   unreferenced copy, then it is uploaded again). Returns True if it is new.
4. `discard(staged)`: drop what a failed push left (always safe to call; aborts an upload
   `stage` started and nobody completed).

`gc` is mark-and-sweep: `iter_blobs()` lists what is stored with its time of writing, the
registry marks what versions reference, and `remove()` sweeps the rest, skipping blobs
younger than `sweep_grace_s` (a remote push uploads before its transaction commits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from registry.errors import RegistryError

Progress = Callable[[int], None]  # called with the number of bytes just processed


@dataclass(frozen=True)
class BlobEntry:
    """One stored blob as a backend lists it: digest, size in bytes, written at (epoch s)."""

    digest: str
    size: int
    modified: float


@dataclass
class CheckResult:
    """What checking one blob found: `problem` is None when intact; `bytes_read` of content."""

    problem: str | None
    bytes_read: int


@runtime_checkable
class BlobBackend(Protocol):
    """Content-addressed, write-once blob storage (see the module docstring for the push steps)."""

    url: str  # where the blobs live, for messages and the recorded store configuration
    remote: bool  # True when bytes leave the machine (staging hashes only)
    sweep_grace_s: float  # gc never removes unreferenced blobs younger than this

    def stage(self, source: Path, progress: Progress | None = None): ...

    def stage_hash_only(self, source: Path, progress: Progress | None = None): ...

    def make_durable(self, staged) -> None: ...

    def publish(self, staged) -> bool: ...

    def discard(self, staged) -> None: ...

    def exists(self, digest: str) -> bool: ...

    def copy_verified(self, digest: str, dest: Path, progress: Progress | None = None) -> int:
        """Write blob `digest` to `dest`, hashing on the way; IntegrityError if the bytes differ."""

    def check_blob(self, digest: str, size: int, *, full: bool,
                   progress: Progress | None = None) -> CheckResult:
        """Is the blob present and intact? `full` re-reads every byte; otherwise the cheapest
        check the backend can make (see each backend)."""

    def iter_blobs(self) -> Iterator[BlobEntry]: ...

    def remove(self, digest: str) -> None: ...

    def leftovers(self, older_than_s: float = 0.0) -> Iterator[tuple[str, int]]:
        """Interrupted writes nobody is finishing: (name, size in bytes or 0 if unknown)."""

    def remove_leftover(self, name: str) -> None: ...


def parse_blob_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without slashes at either end); one-line errors.

    Only S3 URLs are accepted: the local directory is the default and needs no URL.
    """
    text = url.strip()
    if not text.startswith("s3://"):
        raise RegistryError(f"blob URL {url!r}: expected s3://BUCKET[/PREFIX]")
    bucket, _, prefix = text[5:].partition("/")
    if not bucket or len(bucket) < 3 or len(bucket) > 63 or not all(
            c.islower() or c.isdigit() or c in ".-" for c in bucket):
        raise RegistryError(f"blob URL {url!r}: {bucket!r} is not a valid bucket name "
                            "(3-63 lowercase letters, digits, '.' and '-')")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise RegistryError(f"blob URL {url!r}: the prefix must not contain empty, '.' or '..' parts")
    return bucket, prefix


def normalize_blob_url(url: str) -> str:
    """The canonical spelling of a blob URL (what is recorded and compared)."""
    bucket, prefix = parse_blob_url(url)
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
