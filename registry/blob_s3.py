"""The S3-compatible blob backend (`ADAPTERS_BLOB_URL=s3://bucket/prefix`).

Layout under the prefix: `sha256/<2 hex>/<64 hex>` per blob and `adapters-store.json`,
the marker that says which store owns the prefix (its store id, written once).

- **Writes** are conditional (`If-None-Match: *`): a key, once written, is never
  replaced by this code; a concurrent upload of the same content gets 412 and counts as
  present. Every upload carries the SHA-256 of its bytes (`ChecksumSHA256`, whole object
  for a single PUT, per part for multipart, which S3 checks), and the object metadata
  records the blob's digest and number of parts. Blobs over `MULTIPART_THRESHOLD` go in
  `PART_SIZE` parts, `CONCURRENCY` at a time (boto3's own transfer defaults): memory
  stays at about CONCURRENCY x PART_SIZE for the whole store (one semaphore).
  The source is hashed first (its digest is the key, and an existing key needs no
  upload); a single PUT re-hashes the body it sends, a multipart upload checks that the
  file's size and mtime did not change while it was sent (each part carries its own
  SHA-256, computed from the bytes sent), and aborts otherwise.
- **A push overlaps the upload with the adapter's validation**: `stage` starts the
  multipart upload of a new blob in the background right after hashing it; its parts are
  invisible until `make_durable` (after the validation) completes the upload, and
  `discard` (a refused push) aborts it, so a refused adapter leaves no object behind.
- **Reads** stream: ranged GETs in parallel, written in order while hashed; bytes that
  do not hash to their name are refused (IntegrityError) and the output removed. A local
  read-through cache (`registry.blob_cache`) serves repeated reads.
- **Cheap check** (`verify`): one HEAD per blob, no content read: present, size as
  recorded, the metadata digest is the name, and the SHA-256 checksum S3 stored equals
  the digest (single PUT; for multipart S3 stores a checksum of part checksums, which
  must be present). `verify --full` re-reads and re-hashes every byte.
- Credentials and endpoint come the standard AWS way (environment, profiles, instance
  roles; `AWS_ENDPOINT_URL` for S3-compatible servers). boto3 is imported only here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.blob_backend import BlobEntry, CheckResult, parse_blob_url
from registry.blob_cache import BlobCache
from registry.blobs import Staged
from registry.copying import CHUNK, Progress, hash_file
from registry.digests import hex_of, sha256_name
from registry.errors import IntegrityError, RegistryError

MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024  # boto3's TransferConfig defaults (8 MiB parts, 10 threads): measured
CONCURRENCY = 10             # faster than 16 MiB x 8 on loopback (bench/bench_s3.py)
MAX_PARTS = 10_000
MARKER = "adapters-store.json"
DEFAULT_GRACE_S = 3600.0


@dataclass
class S3Staged(Staged):
    """A hashed source; `present`: the key existed when staged; `uploaded`: we wrote it."""

    present: bool = False
    uploaded: bool = False
    stat: tuple[int, int] | None = None  # (size, mtime_ns) of the source when it was hashed
    pending: _Multipart | None = None  # parts being sent beside the validation, not yet completed


class S3BlobStore:
    """Blobs in `s3://bucket/prefix` (see the module docstring)."""

    remote = True

    def __init__(self, url: str, cache: BlobCache | None = None, *, client: Any = None,
                 grace_s: float | None = None):
        self.bucket, self.prefix = parse_blob_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.cache = cache
        env_grace = os.environ.get("ADAPTERS_GC_GRACE_S")
        self.sweep_grace_s = float(grace_s if grace_s is not None else env_grace or DEFAULT_GRACE_S)
        self._client = client
        self._lock = threading.Lock()
        self._parts_in_flight = threading.BoundedSemaphore(CONCURRENCY)  # memory bound of all uploads

    # ------------------------------------------------------------------ connection
    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_client()
            return self._client

    def _call(self, what: str, fn: Callable[..., Any], /, **kw: Any) -> Any:
        """Run one S3 call; turn the ways it fails for a user's reasons into one-line errors."""
        try:
            return fn(**kw)
        except Exception as exc:
            raise translate_error(exc, self.url, what) from None

    def key(self, digest: str) -> str:
        h = hex_of(digest)
        return f"{self._base}sha256/{h[:2]}/{h}"

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise translate_error(exc, self.url, f"HEAD {key}") from None
        except Exception as exc:
            raise translate_error(exc, self.url, f"HEAD {key}") from None

    # ------------------------------------------------------------------ ownership
    def claim(self, store_id: str) -> None:
        """Make sure the prefix is this store's: empty (then marked) or marked with `store_id`.

        A prefix holding anything else (another store's marker, keys that are not blobs of
        this layout, blobs without a marker) is refused: gc would otherwise delete them.
        """
        marker_key = self._base + MARKER
        foreign: list[str] = []
        has_marker = False
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._base, PaginationConfig={"PageSize": 1000})
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"] == marker_key:
                        has_marker = True
                    elif not self._is_blob_key(obj["Key"]) or not has_marker:
                        foreign.append(obj["Key"])
                if len(foreign) >= 3:
                    break
        except Exception as exc:
            raise translate_error(exc, self.url, "list") from None
        if has_marker:
            body = self._call("read the store marker", self.client.get_object,
                              Bucket=self.bucket, Key=marker_key)["Body"].read()
            try:
                owner = json.loads(body).get("store_id")
            except (ValueError, AttributeError):
                owner = None
            if owner != store_id:
                raise RegistryError(f"{self.url}: belongs to another store ({MARKER} names store "
                                    f"{owner!r}); use another bucket or prefix")
            foreign = [k for k in foreign if not self._is_blob_key(k)]
        if foreign:
            raise RegistryError(f"{self.url}: not empty: holds keys that are not this store's blobs "
                                f"(e.g. {foreign[0]!r}); use an empty bucket or another prefix")
        if not has_marker:
            self._put_new(marker_key, json.dumps({"store_id": store_id, "layout": "sha256/<2>/<64>"}).encode())

    def _is_blob_key(self, key: str) -> bool:
        rest = key[len(self._base):]
        parts = rest.split("/")
        return (len(parts) == 3 and parts[0] == "sha256" and len(parts[2]) == 64
                and parts[1] == parts[2][:2] and all(c in "0123456789abcdef" for c in parts[2]))

    def _put_new(self, key: str, body: bytes, **extra: Any) -> bool:
        """Conditional PUT; False if the key already exists (412)."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **extra)
            return True
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise translate_error(exc, self.url, f"PUT {key}") from None
        except Exception as exc:
            raise translate_error(exc, self.url, f"PUT {key}") from None

    # ------------------------------------------------------------------ writing
    def stage(self, source: Path, progress: Progress | None = None) -> S3Staged:
        """Hash `source` (one read) and ask whether the bucket holds it; uploads nothing yet."""
        before = _stat(source)
        digest, size = hash_file(source, progress)
        if _stat(source) != before or before[0] != size:
            raise RegistryError(f"{source}: changed while it was being pushed; push it again")
        st = S3Staged(Path(source), digest, size, stat=before)
        st.present = self._head(self.key(digest)) is not None
        if not st.present and size > MULTIPART_THRESHOLD:  # parts go while the adapter validates
            st.pending = self._start_multipart(st.source, self.key(digest), size, {"sha256": hex_of(digest)},
                                               None, before)
        return st

    def stage_hash_only(self, source: Path, progress: Progress | None = None) -> S3Staged:
        """Hash and HEAD only; nothing is sent (the local backend's re-push check)."""
        before = _stat(source)
        digest, size = hash_file(source, progress)
        st = S3Staged(Path(source), digest, size, stat=before)
        st.present = self._head(self.key(digest)) is not None
        return st

    def make_durable(self, staged: S3Staged) -> None:
        """Upload a staged blob the bucket does not hold (outside the database lock): complete
        the multipart upload `stage` started, or send it now."""
        if staged.pending is not None:
            pending, staged.pending = staged.pending, None
            staged.uploaded = pending.finish()
            staged.present = True
        elif not staged.present and not staged.uploaded:
            staged.uploaded = self.upload(staged.source, staged.digest, staged.size, expect=staged.stat)
            staged.present = True

    def publish(self, staged: S3Staged) -> bool:
        """Inside the write transaction: the blob must be in the bucket now.

        gc holds the same lock while it sweeps, so once this HEAD succeeds the blob stays
        until the version referencing it commits. If a gc removed an old unreferenced copy
        since `stage` saw it, the blob is uploaded again.
        """
        if self._head(self.key(staged.digest)) is None:
            self.upload(staged.source, staged.digest, staged.size, expect=staged.stat)
            staged.uploaded = True
        return staged.uploaded

    def discard(self, staged: S3Staged) -> None:
        """Abort a multipart upload `stage` started and nobody completed (a refused push); an
        uploaded but unreferenced blob is gc's (after the grace)."""
        if staged.pending is not None:
            pending, staged.pending = staged.pending, None
            pending.cancel()

    def exists(self, digest: str) -> bool:
        return self._head(self.key(digest)) is not None

    def upload(self, source: Path, digest: str, size: int, progress: Progress | None = None, *,
               expect: tuple[int, int] | None = None) -> bool:
        """Conditional upload of `source` as `digest`; False if the key was already there.

        `expect`: the source's (size, mtime_ns) when it was hashed; a multipart upload of a
        file that differs from it (or changes while sent) is aborted.
        """
        key = self.key(digest)
        meta = {"sha256": hex_of(digest)}
        if size <= MULTIPART_THRESHOLD:
            with open(source, "rb") as fh:
                body = fh.read()
            raw = hashlib.sha256(body).digest()
            if sha256_name(raw.hex()) != digest or len(body) != size:
                raise RegistryError(f"{source}: changed while it was being pushed; push it again")
            meta["parts"] = "0"
            wrote = self._put_new(key, body, ChecksumSHA256=_b64(raw), ChecksumAlgorithm="SHA256", Metadata=meta)
            if progress:
                progress(size)
            return wrote
        return self._upload_multipart(source, key, size, meta, progress, expect or _stat(source))

    def _upload_multipart(self, source: Path, key: str, size: int, meta: dict[str, str],
                          progress: Progress | None, expect: tuple[int, int]) -> bool:
        return self._start_multipart(source, key, size, meta, progress, expect).finish()

    def _start_multipart(self, source: Path, key: str, size: int, meta: dict[str, str],
                         progress: Progress | None, expect: tuple[int, int]) -> _Multipart:
        """Create the multipart upload and start sending its parts in the background."""
        if _stat(source) != expect or expect[0] != size:
            raise RegistryError(f"{source}: changed while it was being pushed; push it again")
        part_size = max(PART_SIZE, -(-size // MAX_PARTS))
        meta = {**meta, "parts": str(-(-size // part_size))}
        up = self._call("start a multipart upload", self.client.create_multipart_upload,
                        Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256", Metadata=meta)
        return _Multipart(self, source, key, up["UploadId"], size, part_size, expect, progress)

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    # ------------------------------------------------------------------ reading
    def copy_verified(self, digest: str, dest: Path, progress: Progress | None = None) -> int:
        """Write blob `digest` to `dest` (from the cache when it holds it), verified."""
        if self.cache is not None:
            size = self.cache.get(digest, dest, progress)
            if size is not None:
                return size
        with open(dest, "wb", buffering=0) as out:
            got, size = self._stream(digest, out, progress)
            if got == digest:
                os.fsync(out.fileno())
        if got != digest:
            dest.unlink()
            raise IntegrityError(f"blob {digest} in {self.url} is corrupt (its bytes hash to {got})")
        if self.cache is not None:
            self.cache.put(digest, dest)
        return size

    def _stream(self, digest: str, out: Any, progress: Progress | None) -> tuple[str, int]:
        """GET the blob in PART_SIZE ranges (CONCURRENCY in flight), write in order while
        hashing; `out` may be None (hash only). Returns (digest of the bytes, size)."""
        key = self.key(digest)

        def fetch(start: int, end: int) -> bytes:
            return self._get(key, f"bytes={start}-{end}")["Body"].read()

        h = hashlib.sha256()
        first, size = self._first_range(key)
        h.update(first)
        if out is not None:
            _write_all(out, first)
        if progress:
            progress(len(first))
        offset = len(first)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            pending: deque[Future] = deque()
            nxt = offset
            while nxt < size or pending:
                while nxt < size and len(pending) < CONCURRENCY:
                    end = min(nxt + PART_SIZE, size) - 1
                    pending.append(pool.submit(fetch, nxt, end))
                    nxt = end + 1
                data = pending.popleft().result()
                h.update(data)
                if out is not None:
                    _write_all(out, data)
                if progress:
                    progress(len(data))
                offset += len(data)
        if offset != size:
            return f"(a short read: {offset} of {size} bytes)", offset
        return sha256_name(h.hexdigest()), size

    def _first_range(self, key: str) -> tuple[bytes, int]:
        r = self._get(key, f"bytes=0-{PART_SIZE - 1}")
        cr = r.get("ContentRange")
        total = int(cr.rsplit("/", 1)[1]) if cr else r["ContentLength"]
        return r["Body"].read(), total

    def _get(self, key: str, rng: str) -> dict:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key, Range=rng)
        except ClientError as exc:
            code = _code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise IntegrityError(f"blob sha256:{key.rsplit('/', 1)[1]} is missing from {self.url}") from None
            if code == "InvalidRange":  # an empty object
                return {"Body": _Empty(), "ContentLength": 0}
            raise translate_error(exc, self.url, f"GET {key}") from None
        except Exception as exc:
            raise translate_error(exc, self.url, f"GET {key}") from None

    def check_blob(self, digest: str, size: int, *, full: bool = False,
                   progress: Progress | None = None) -> CheckResult:
        """Cheap (one HEAD, no content) or `full` (re-read and re-hash); see the module docstring."""
        head = self._head(self.key(digest))
        if head is None:
            return CheckResult(f"blob {digest} is missing from {self.url}", 0)
        if head["ContentLength"] != size:
            return CheckResult(f"blob {digest} is altered (size {head['ContentLength']}, recorded {size})", 0)
        meta = head.get("Metadata") or {}
        if meta.get("sha256") != hex_of(digest):
            return CheckResult(f"blob {digest} is altered (object not written by this store: "
                               "its metadata does not name this digest)", 0)
        checksum = head.get("ChecksumSHA256")
        if not checksum:
            return CheckResult(f"blob {digest} is altered (no SHA-256 checksum stored with it)", 0)
        if meta.get("parts") == "0" and checksum != _b64(bytes.fromhex(hex_of(digest))):
            return CheckResult(f"blob {digest} is altered (the SHA-256 checksum S3 stored differs)", 0)
        if not full:
            return CheckResult(None, 0)
        got, read = self._stream(digest, None, progress)
        if got != digest:
            return CheckResult(f"blob {digest} is altered (its bytes hash to {got})", read)
        return CheckResult(None, read)

    # ------------------------------------------------------------------ scanning
    def iter_blobs(self) -> Iterator[BlobEntry]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._base + "sha256/")
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    if self._is_blob_key(obj["Key"]):
                        yield BlobEntry(sha256_name(obj["Key"].rsplit("/", 1)[1]), obj["Size"],
                                        obj["LastModified"].timestamp())
        except RegistryError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.url, "list") from None

    def remove(self, digest: str) -> None:
        self._call(f"delete {digest}", self.client.delete_object, Bucket=self.bucket, Key=self.key(digest))
        if self.cache is not None:
            self.cache.store.remove(digest)

    def leftovers(self, older_than_s: float = 0.0) -> Iterator[tuple[str, int]]:
        """Multipart uploads started more than `older_than_s` ago and never completed."""
        import time

        now = time.time()
        resp = self._call("list multipart uploads", self.client.list_multipart_uploads,
                          Bucket=self.bucket, Prefix=self._base + "sha256/")
        for u in resp.get("Uploads", []):
            if now - u["Initiated"].timestamp() >= older_than_s:
                yield f"{self.url.split('/', 3)[0]}//{self.bucket}/{u['Key']}?uploadId={u['UploadId']}", 0

    def remove_leftover(self, name: str) -> None:
        key_part, _, upload_id = name.partition("?uploadId=")
        key = key_part.split(f"//{self.bucket}/", 1)[1]
        self._abort(key, upload_id)


class _Multipart:
    """One multipart upload: parts are read and sent by a background thread as soon as it is
    created (at most CONCURRENCY parts in memory across the store); `finish()` waits for
    them and completes the upload conditionally (the object appears only then); `cancel()`
    stops sending and aborts it. Either may be called once; the other is then a no-op."""

    def __init__(self, store: S3BlobStore, source: Path, key: str, upload_id: str, size: int, part_size: int,
                 expect: tuple[int, int], progress: Progress | None):
        self.store, self.source, self.key, self.upload_id = store, source, key, upload_id
        self.size, self.part_size, self.expect, self.progress = size, part_size, expect, progress
        self.parts: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._send_all, name=f"s3-upload-{key[-12:]}", daemon=True)
        self._thread.start()

    def _send_one(self, number: int, data: bytes) -> dict[str, Any]:
        try:
            if self._stop.is_set():
                raise _Cancelled
            cs = _b64(hashlib.sha256(data).digest())
            r = self.store._call(f"upload part {number} of {self.key}", self.store.client.upload_part,
                                 Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number,
                                 Body=data, ChecksumSHA256=cs, ChecksumAlgorithm="SHA256")
            if self.progress:
                self.progress(len(data))
            return {"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": cs}
        finally:
            self.store._parts_in_flight.release()

    def _send_all(self) -> None:
        nparts = -(-self.size // self.part_size)
        gate = self.store._parts_in_flight
        futures: deque[Future] = deque()
        results: list[Any] = []
        try:
            with open(self.source, "rb", buffering=0) as fh, ThreadPoolExecutor(CONCURRENCY) as pool:
                try:
                    for number in range(1, nparts + 1):
                        while not gate.acquire(timeout=0.2):  # bounded memory: a slot before reading
                            if self._stop.is_set():
                                raise _Cancelled
                        try:
                            if self._stop.is_set():
                                raise _Cancelled
                            data = _read_exact(fh, min(self.part_size, self.size - (number - 1) * self.part_size))
                            futures.append(pool.submit(self._send_one, number, data))
                        except BaseException:
                            gate.release()
                            raise
                        del data
                        while futures and futures[0].done():
                            results.append(futures.popleft().result())  # a failed part stops the reading
                    if fh.read(1):
                        raise RegistryError(f"{self.source}: changed while it was being pushed (it grew); push it again")
                except BaseException:
                    self._stop.set()  # parts not started yet are skipped
                    raise
                finally:
                    results += [_result_or_error(f) for f in futures]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            self.parts = results
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> bool:
        """Wait for every part, check the source did not change, complete (If-None-Match: *).
        False when the key already existed (412); the upload is aborted then."""
        from botocore.exceptions import ClientError

        if self._done:
            raise RegistryError(f"{self.key}: upload already finished or cancelled")
        self._done = True
        store = self.store
        try:
            self._thread.join()
            if self.error is not None:
                raise self.error
            if _stat(self.source) != self.expect:
                raise RegistryError(f"{self.source}: changed while it was being pushed; push it again")
            try:
                store.client.complete_multipart_upload(Bucket=store.bucket, Key=self.key, UploadId=self.upload_id,
                                                       MultipartUpload={"Parts": self.parts}, IfNoneMatch="*")
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    store._abort(self.key, self.upload_id)
                    return False
                raise translate_error(exc, store.url, f"complete {self.key}") from None
            except Exception as exc:
                raise translate_error(exc, store.url, f"complete {self.key}") from None
        except BaseException:
            self._stop.set()
            self._thread.join()
            store._abort(self.key, self.upload_id)
            raise
        return True

    def cancel(self) -> None:
        """Stop sending and abort the upload (nothing becomes visible)."""
        if self._done:
            return
        self._done = True
        self._stop.set()
        self._thread.join()
        self.store._abort(self.key, self.upload_id)


class _Cancelled(Exception):
    """The upload was cancelled (a refused push)."""


def _result_or_error(f: Future) -> Any:
    try:
        return f.result()
    except BaseException as exc:
        return exc


class _Empty:
    @staticmethod
    def read() -> bytes:
        return b""


def _read_exact(fh: Any, n: int) -> bytes:
    """Up to `n` bytes (fewer only at the end of the file), without an extra copy."""
    chunks = []
    while n > 0:
        b = fh.read(n)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _write_all(out: Any, data: bytes) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += out.write(view[done:done + 64 * CHUNK])


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def make_client() -> Any:
    """A boto3 S3 client configured the standard AWS way (env, profiles, AWS_ENDPOINT_URL)."""
    import boto3
    from botocore.config import Config

    try:
        session = boto3.session.Session()
        return session.client("s3", config=Config(
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=120,
            max_pool_connections=2 * CONCURRENCY + 4,
            request_checksum_calculation="when_required", response_checksum_validation="when_required"))
    except Exception as exc:
        raise translate_error(exc, "s3", "configure the S3 client") from None


def translate_error(exc: BaseException, url: str, what: str) -> BaseException:
    """A one-line RegistryError for the ways S3 fails because of the user's setup."""
    if isinstance(exc, RegistryError):
        return exc
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return exc
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return RegistryError(f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if isinstance(exc, bx.ProfileNotFound):
        return RegistryError(f"{url}: {exc}")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                        bx.ReadTimeoutError)):
        return RegistryError(f"{url}: cannot reach the object store at {endpoint} ({what}: {exc})")
    if isinstance(exc, bx.ClientError):
        code = _code(exc)
        msg = exc.response.get("Error", {}).get("Message") or code
        if code in ("NoSuchBucket",):
            return RegistryError(f"{url}: the bucket does not exist at {endpoint}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"):
            return RegistryError(f"{url}: access denied ({code}: check the AWS credentials)")
        return RegistryError(f"{url}: {what} failed ({code}: {msg})")
    if isinstance(exc, bx.BotoCoreError):
        return RegistryError(f"{url}: {what} failed ({exc})")
    return exc
