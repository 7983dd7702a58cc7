"""Blobs in S3-compatible storage, against moto's real S3 server on 127.0.0.1 (started by
conftest's `s3_endpoint`), with SQLite and PostgreSQL.

What moto does and does not do (checked in moto 5.2): it enforces `If-None-Match: *` on
PutObject and CompleteMultipartUpload (412), stores and returns `ChecksumSHA256` and the
object metadata, but does not verify a sent checksum against the body; the tamper tests
therefore check what this store verifies itself (metadata, size, checksum presence and
value, and the re-hash on every read / `verify --full`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest

from registry.api import Registry
from registry.errors import IntegrityError, RegistryError
from tests.builders import write_adapter
from tests.cli_runner import invoke


def _shared_url(db_url: str | None, tmp_path: Path) -> str:
    """The database two homes share: the test's PostgreSQL database, or one SQLite file."""
    return db_url or f"sqlite:///{tmp_path / 'shared.db'}"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _keys(bucket: str) -> list[str]:
    return [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture
def two_homes(tmp_path, db_url, s3_bucket):
    """(machine A bound to the bucket, machine B with only the database URL)."""
    url = _shared_url(db_url, tmp_path)
    a = Registry.open(tmp_path / "home-a", url, blob_url=f"s3://{s3_bucket}/team")
    b = Registry.open(tmp_path / "home-b", url)
    yield a, b
    a.close()
    b.close()


def test_push_on_one_home_pulls_byte_identical_on_the_other(two_homes, tmp_path, s3_bucket):
    a, b = two_homes
    src = write_adapter(tmp_path / "src", kind="mora", r=8, dim=32)
    v = a.push(src, "team/m", tags=["prod"])
    assert v.ref == "team/m:1"
    # machine B never named the bucket: the URL recorded in the database is used
    out = b.pull("team/m@prod", tmp_path / "pulled")
    assert _files(out) == _files(src)
    assert b.blobs.url == f"s3://{s3_bucket}/team"
    # nothing of the blobs under either home except B's read-through cache
    assert not any((tmp_path / "home-a" / "blobs").rglob("*")) if (tmp_path / "home-a" / "blobs").exists() else True
    cached = sorted(p.name for p in (tmp_path / "home-b" / "blob-cache" / "sha256").rglob("*") if p.is_file())
    assert cached == sorted(f["digest"][7:] for f in b.resolve("team/m:1").files)
    keys = _keys(s3_bucket)
    assert "team/adapters-store.json" in keys
    assert sorted(k.rsplit("/", 1)[1] for k in keys if "/sha256/" in k) == cached
    # B pushes a child; A pulls it
    src2 = write_adapter(tmp_path / "src2", kind="mora", r=8, dim=32, seed=3)
    assert b.push(src2, "team/m", parent="team/m:1").ref == "team/m:2"
    assert _files(a.pull("team/m:2", tmp_path / "pulled2")) == _files(src2)
    assert a.verify().ok and b.verify(full=True).ok


def test_repush_uploads_nothing_and_writes_are_conditional(two_homes, tmp_path, s3_bucket):
    a, _ = two_homes
    src = write_adapter(tmp_path / "src")
    a.push(src, "x")
    s3 = boto3.client("s3")
    digest = a.resolve("x:1").files[1]["digest"]
    key = a.blobs.key(digest)
    before = s3.head_object(Bucket=s3_bucket, Key=key)
    assert a.push(src, "x").ref == "x:1"  # identical content: the existing version
    assert s3.head_object(Bucket=s3_bucket, Key=key)["LastModified"] == before["LastModified"]
    # write-once: the server refuses a conditional overwrite, and the backend reports "was there"
    with pytest.raises(s3.exceptions.ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"other", IfNoneMatch="*")
    assert a.blobs._put_new(key, b"other") is False
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == (src / "adapter_model.safetensors").read_bytes()
    head = s3.head_object(Bucket=s3_bucket, Key=key, ChecksumMode="ENABLED")
    import base64

    assert head["Metadata"]["sha256"] == digest[7:]
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == digest[7:]


def test_tampered_bucket_is_detected(two_homes, tmp_path, s3_bucket):
    a, b = two_homes
    src = write_adapter(tmp_path / "src")
    a.push(src, "x")
    digest = a.resolve("x:1").files[1]["digest"]
    key = a.blobs.key(digest)
    s3 = boto3.client("s3")
    original = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    flipped = bytearray(original)
    flipped[-1] ^= 1
    # 1. a plain overwrite (no metadata): the cheap check sees it without reading content
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(flipped))
    rep = b.verify()
    assert not rep.ok and rep.bytes_read == 0 and rep.mode == "cheap"
    assert any(digest in p and "altered" in p for p in rep.problems)
    with pytest.raises(IntegrityError, match="corrupt"):
        b.pull("x:1", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # 2. an overwrite that copies the metadata and the checksum header: only a re-read sees it
    import base64

    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(flipped), Metadata={"sha256": digest[7:], "parts": "0"},
                  ChecksumSHA256=base64.b64encode(bytes.fromhex(digest[7:])).decode(), ChecksumAlgorithm="SHA256")
    full = b.verify(full=True)
    assert not full.ok and full.bytes_read >= len(original)
    assert any(f"{digest} is altered (its bytes hash to" in p for p in full.problems)
    res = invoke(["verify", "--full", "--home", str(tmp_path / "home-b"), "--db-url", b.url], {})
    assert res.code == 1 and "DAMAGED" in res.out
    # 3. a deleted object
    s3.delete_object(Bucket=s3_bucket, Key=key)
    assert any("missing" in p for p in b.verify().problems)


def test_gc_keeps_the_fresh_blobs_of_a_concurrent_push(two_homes, tmp_path, s3_bucket, monkeypatch):
    """A push uploads, then stops before its transaction; gc runs; the push then commits."""
    a, b = two_homes
    import registry.ingest as api

    reached, go = threading.Event(), threading.Event()
    real = api.fault_point

    def pause(point: str) -> None:
        if point == "durable" and threading.current_thread().name == "pusher":
            reached.set()
            assert go.wait(60)
        real(point)

    monkeypatch.setattr(api, "fault_point", pause)
    src = write_adapter(tmp_path / "src", seed=7)
    result: dict = {}

    def push() -> None:
        try:
            result["v"] = a.push(src, "race")
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["err"] = exc

    t = threading.Thread(target=push, name="pusher")
    t.start()
    assert reached.wait(60)
    fresh = {k.rsplit("/", 1)[1] for k in _keys(s3_bucket) if "/sha256/" in k}
    assert len(fresh) == 2  # uploaded, referenced by nothing yet
    rep = b.gc()  # default grace (1 hour)
    assert rep.blobs == [] and sorted(d[7:] for d in rep.kept_young) == sorted(fresh)
    go.set()
    t.join(60)
    assert "err" not in result, result.get("err")
    assert _files(b.pull("race:1", tmp_path / "out")) == _files(src)
    assert b.verify(full=True).ok


def test_gc_without_grace_mid_push_makes_the_push_upload_again(two_homes, tmp_path, s3_bucket, monkeypatch):
    """Second line of defence: with --grace 0 gc deletes the fresh blobs; the push re-checks
    them under the writer lock (which gc holds while sweeping) and uploads them again."""
    a, b = two_homes
    import registry.ingest as api

    reached, go = threading.Event(), threading.Event()
    real = api.fault_point

    def pause(point: str) -> None:
        if point == "durable" and threading.current_thread().name == "pusher":
            reached.set()
            assert go.wait(60)
        real(point)

    monkeypatch.setattr(api, "fault_point", pause)
    src = write_adapter(tmp_path / "src", seed=8)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("v", a.push(src, "race")), name="pusher")
    t.start()
    assert reached.wait(60)
    rep = b.gc(grace_s=0)
    assert len(rep.blobs) == 2
    assert not [k for k in _keys(s3_bucket) if "/sha256/" in k]
    go.set()
    t.join(60)
    assert result["v"].ref == "race:1"
    assert _files(b.pull("race:1", tmp_path / "out")) == _files(src)


def test_gc_sweeps_unreferenced_blobs_and_trims_the_cache(two_homes, tmp_path, s3_bucket):
    a, b = two_homes
    a.push(write_adapter(tmp_path / "s1", seed=1), "g")
    a.push(write_adapter(tmp_path / "s2", seed=2), "g")
    b.pull("g:1", tmp_path / "p1")
    cache = tmp_path / "home-b" / "blob-cache" / "sha256"
    n_cached = len([p for p in cache.rglob("*") if p.is_file()])
    assert n_cached == 2
    a.delete("g:1")
    assert b.gc().blobs == []  # within the grace period: kept
    rep = b.gc(grace_s=0)
    # the two versions share config.json; only g:1's weights are unreferenced now
    assert len(rep.blobs) == 1
    remaining = {k.rsplit("/", 1)[1] for k in _keys(s3_bucket) if "/sha256/" in k}
    assert remaining == {f["digest"][7:] for f in a.resolve("g:2").files}
    left = [p for p in cache.rglob("*") if p.is_file()]
    assert len(left) == 1 and left[0].name in remaining  # the swept blob left the cache too
    b.blobs.cache.max_bytes = 1  # gc also trims the cache to its bound (least recently used first)
    assert b.gc().cache_trimmed == 1 and not [p for p in cache.rglob("*") if p.is_file()]
    assert a.verify().ok


def test_cache_entries_are_verified_and_refetched(two_homes, tmp_path):
    a, b = two_homes
    src = write_adapter(tmp_path / "src")
    a.push(src, "c")
    b.pull("c:1", tmp_path / "p1")
    digest = b.resolve("c:1").files[1]["digest"]
    entry = b.blobs.cache.store.path(digest)
    entry.chmod(0o644)
    entry.write_bytes(b"garbage")
    assert _files(b.pull("c:1", tmp_path / "p2")) == _files(src)  # bad entry dropped, fetched again
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == digest[7:]


def test_multipart_blob_round_trip(s3_bucket, tmp_path, monkeypatch):
    """A blob over the multipart threshold: parts with SHA-256 checksums, conditional complete,
    parallel ranged reads; cheap and full checks."""
    import registry.blob_s3 as s3mod
    from registry.blob_s3 import S3BlobStore

    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 * 1024 * 1024)  # S3's smallest part
    store = S3BlobStore(f"s3://{s3_bucket}/mp")
    data = hashlib.sha256(b"seed").digest() * (12 * 1024 * 1024 // 32 + 7)
    f = tmp_path / "big.bin"
    f.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.upload(f, digest, len(data)) is True
    assert store.upload(f, digest, len(data)) is False  # conditional complete: 412
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key=store.key(digest), ChecksumMode="ENABLED")
    assert head["Metadata"] == {"sha256": digest[7:], "parts": "3"} and head["ChecksumSHA256"]
    assert not boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    out = tmp_path / "back.bin"
    assert store.copy_verified(digest, out) == len(data)
    assert out.read_bytes() == data
    assert store.check_blob(digest, len(data)).problem is None
    full = store.check_blob(digest, len(data), full=True)
    assert full.problem is None and full.bytes_read == len(data)
    # a source rewritten between hashing (stage) and uploading is refused, nothing is left
    g = tmp_path / "big2.bin"
    g.write_bytes(data[::-1])
    staged = store.stage(g)
    g.write_bytes(data)  # same size, other bytes
    with pytest.raises(RegistryError, match="changed while"):
        store.make_durable(staged)
    assert not store.exists(staged.digest)
    assert not boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


# ----------------------------------------------------------------------------- bad input

def _snapshot(home: Path, url: str):
    reg = Registry.open(home, url)
    try:
        with reg._read() as s:
            from sqlalchemy import func, select

            from registry import models

            return tuple(s.scalar(select(func.count()).select_from(t)) for t in
                         (models.Version, models.Blob, models.Setting, models.AuditEvent))
    finally:
        reg.close()


def _push(tmp_path: Path, url: str, blob_url: str) -> tuple[int, str]:
    src = write_adapter(tmp_path / "bad-src")
    res = invoke(["push", str(src), "--name", "x", "--home", str(tmp_path / "h"), "--db-url", url,
                  "--blob-url", blob_url], {})
    return res.code, res.err


@pytest.mark.parametrize("case", ["unreachable", "no-credentials", "foreign-keys", "no-bucket", "bad-url"])
def test_bad_blob_store_is_one_line_exit_2_store_unchanged(case, tmp_path, s3_bucket, monkeypatch):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    before = _snapshot(tmp_path / "h", url)
    blob_url = f"s3://{s3_bucket}/p"
    expect = ""
    if case == "unreachable":
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        expect = "cannot reach the object store"
    elif case == "no-credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        expect = "no AWS credentials found"
    elif case == "foreign-keys":
        boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/notes.txt", Body=b"hello")
        expect = "not empty"
    elif case == "no-bucket":
        blob_url = "s3://no-such-bucket-here/p"
        expect = "bucket does not exist"
    else:
        blob_url = "gs://bucket/p"
        expect = "expected s3://BUCKET"
    code, err = _push(tmp_path, url, blob_url)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert _snapshot(tmp_path / "h", url) == before
    assert not (tmp_path / "h" / "blobs" / "sha256").exists() or not any((tmp_path / "h" / "blobs" / "sha256").iterdir())


def test_other_stores_bucket_and_mismatched_url_are_refused(tmp_path, s3_bucket):
    url1, url2 = f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'two.db'}"
    one = Registry.open(tmp_path / "h1", url1, blob_url=f"s3://{s3_bucket}/shared")
    one.push(write_adapter(tmp_path / "src"), "x")
    one.close()
    # a second database cannot adopt the first store's prefix
    code, err = _push(tmp_path, url2, f"s3://{s3_bucket}/shared")
    assert code == 2 and "belongs to another store" in err
    # the first store opened with another URL: error, not a silent switch
    res = invoke(["list", "--home", str(tmp_path / "h1"), "--db-url", url1, "--blob-url", f"s3://{s3_bucket}/other"], {})
    assert res.code == 2 and "differs from" in res.err and len(res.err.strip().splitlines()) == 1
    # a store that already has local blobs cannot be switched to a bucket
    local = Registry.open(tmp_path / "h3", f"sqlite:///{tmp_path / 'three.db'}")
    local.push(write_adapter(tmp_path / "src3"), "y")
    local.close()
    res = invoke(["push", str(tmp_path / "src3"), "--name", "y", "--home", str(tmp_path / "h3"),
                  "--db-url", f"sqlite:///{tmp_path / 'three.db'}", "--blob-url", f"s3://{s3_bucket}/three"], {})
    assert res.code == 2 and "already holds" in res.err


def test_listing_does_not_import_boto3(tmp_path, s3_bucket):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry.open(tmp_path / "h", url, blob_url=f"s3://{s3_bucket}/l")
    reg.push(write_adapter(tmp_path / "src"), "x")
    reg.close()
    code = ("import sys; from registry.api import Registry; r = Registry.open(sys.argv[1], sys.argv[2]); "
            "assert [v.ref for v in r.list()] == ['x:1']; assert r.show('x:1').digest; "
            "bad = [m for m in ('boto3', 'botocore', 'huggingface_hub', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "h"), url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- what is sent

def _record_requests(client) -> list[tuple[str, dict, bytes]]:
    """(operation, headers, body) of every request `client` sends, taken at botocore's
    `before-send`, i.e. exactly what goes on the wire."""
    sent: list[tuple[str, dict, bytes]] = []

    def hook(request, event_name, **_):
        body = request.body
        if hasattr(body, "read"):  # a stream botocore wraps the bytes in: read it, then rewind
            pos = body.tell()
            body, _ = body.read(), body.seek(pos)
        body = body.encode() if isinstance(body, str) else bytes(body or b"")
        sent.append((event_name.rsplit(".", 1)[1], dict(request.headers), body))

    client.meta.events.register("before-send.s3", hook)
    return sent


def _b64_sha256(data: bytes) -> str:
    import base64

    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _header(headers: dict, name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name:
            return v.decode() if isinstance(v, bytes) else v
    return None


def test_uploads_send_the_sha256_of_the_bytes_they_send(s3_bucket, tmp_path, monkeypatch):
    """moto stores a sent checksum without checking it against the body (it accepts a wrong
    one), so S3's own rejection cannot be exercised here; this proves the other half: every
    PUT and every part carries `x-amz-checksum-sha256` equal to the SHA-256 of exactly the
    bytes on the wire (computed here independently, from the file), and the conditional
    complete lists those part checksums."""
    import re

    import registry.blob_s3 as s3mod
    from registry.blob_s3 import S3BlobStore

    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 * 1024 * 1024)
    store = S3BlobStore(f"s3://{s3_bucket}/cs")
    sent = _record_requests(store.client)
    small = tmp_path / "small.bin"
    small.write_bytes(b"adapter bytes " * 1000)
    data = hashlib.sha256(b"big").digest() * (11 * 1024 * 1024 // 32 + 5)  # 3 parts, the last one short
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    for f in (small, big):
        st = store.stage(f)
        store.make_durable(st)
        assert st.uploaded
    puts = [(h, b) for op, h, b in sent if op == "PutObject"]
    assert len(puts) == 1
    headers, body = puts[0]
    assert body == small.read_bytes()
    assert _header(headers, "x-amz-checksum-sha256") == _b64_sha256(small.read_bytes())
    assert _header(headers, "if-none-match") == "*"
    parts = [(h, b) for op, h, b in sent if op == "UploadPart"]
    assert len(parts) == 3
    ps = 5 * 1024 * 1024
    expected = {_b64_sha256(data[i * ps:(i + 1) * ps]) for i in range(3)}
    got = set()
    for h, b in parts:
        assert _header(h, "x-amz-checksum-sha256") == _b64_sha256(b)  # the bytes on the wire
        got.add(_b64_sha256(b))
    assert got == expected  # and they are the file's parts
    (create,) = [h for op, h, _ in sent if op == "CreateMultipartUpload"]
    assert _header(create, "x-amz-checksum-algorithm") == "SHA256"
    (complete_h, complete_b) = [(h, b) for op, h, b in sent if op == "CompleteMultipartUpload"][0]
    assert _header(complete_h, "if-none-match") == "*"
    assert set(re.findall(rb"<ChecksumSHA256>([^<]+)</ChecksumSHA256>", complete_b)) == {e.encode() for e in expected}


@pytest.mark.parametrize("valid", [True, False])
def test_push_sends_parts_while_the_adapter_validates(valid, s3_bucket, tmp_path, monkeypatch):
    """The upload overlaps the validation: the validation below starts only once a part has
    been sent (it would wait forever, and fail, if the upload waited for it). The object
    appears only after the validation: a refused adapter leaves no object and no upload."""
    import json

    import registry.blob_s3 as s3mod
    import registry.ingest as ingest

    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 * 1024 * 1024)
    src = write_adapter(tmp_path / "src", r=64, dim=8192)  # 8 MiB of weights: 2 parts
    if not valid:
        cfg = json.loads((src / "adapter_config.json").read_text())
        (src / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": "x"}))
    reg = Registry.open(tmp_path / "home", blob_url=f"s3://{s3_bucket}/ov")
    sent = _record_requests(reg.blobs.client)
    part_sent = threading.Event()
    reg.blobs.client.meta.events.register("after-call.s3.UploadPart", lambda **_: part_sent.set())
    completed_before_validation: list[bool] = []
    real_inspect = ingest.inspect_adapter

    def inspect_after_a_part(folder):
        assert part_sent.wait(30), "no part was sent while the adapter was being validated"
        completed_before_validation.append(any(op == "CompleteMultipartUpload" for op, _, _ in sent))
        return real_inspect(folder)

    monkeypatch.setattr(ingest, "inspect_adapter", inspect_after_a_part)
    try:
        if valid:
            info = reg.push(src, "ov/a")
            assert _files(reg.pull(info.ref, tmp_path / "out")) == _files(src)
        else:
            with pytest.raises(RegistryError, match="lora_alpha"):
                reg.push(src, "ov/a")
            assert [k for k in _keys(s3_bucket) if "/sha256/" in k] == []
            assert reg.list() == []
    finally:
        reg.close()
    assert completed_before_validation == [False]
    assert not boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
