"""Blobs in S3: push/pull of a ~1 GiB adapter vs boto3's own transfer of the same bytes, and
`verify` of 1,000 remote blobs (cheap and --full), through moto's S3 server on loopback.

    python bench/bench_s3.py [--gb 1.0] [--runs 3] [--blobs 1000] [--blob-kb 256] [--dir DIR]

The server runs in its own process (`python -m moto.server`, 127.0.0.1), so client and
server do not share a GIL. Peers, alternated with ours in every run:
- `upload_file`: boto3's `upload_file` of the adapter file to another key (its defaults:
  8 MiB parts, 10 threads);
- `download_file`: boto3's `download_file` of that object to a fresh file.
`push` is `Registry.push` into a fresh store bound to a fresh prefix (hash, HEAD, upload
with SHA-256 part checksums and a conditional complete, database commit; the validation
of the adapter overlaps); `pull` is `Registry.pull` into a fresh folder with a cold read
cache (parallel ranged GETs hashed in order, fsync, then a copy into the read cache).
Targets: push and pull throughput >= 0.8x the peer's.

Verify: `--blobs` blobs of `--blob-kb` KiB each are uploaded through the backend and
recorded, then `verify` (cheap: one HEAD per blob, 16 in flight) and `verify --full`
(every byte re-read and re-hashed) are timed; prints seconds and blob bytes read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_registry_push import make_adapter, timed  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "TMPDIR": str(root)}  # moto spools large objects to temp files
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, endpoint
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("moto server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--blobs", type=int, default=1000)
    ap.add_argument("--blob-kb", type=int, default=256)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    proc, endpoint = start_moto(root)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        from registry.api import Registry

        s3 = boto3.client("s3")
        bucket = "bench-adapters"
        s3.create_bucket(Bucket=bucket)
        src = make_adapter(root / "adapter", args.gb)
        weights = src / "adapter_model.safetensors"
        size = weights.stat().st_size
        warm = make_adapter(root / "warm", 0.001)
        Registry.open(root / "warmhome", blob_url=f"s3://{bucket}/warm").push(warm, "warm")  # torch import
        weights.read_bytes()  # page cache warm for both contenders
        push_t, pull_t, up_t, down_t = [], [], [], []
        for i in range(args.runs):
            up_t.append(timed(lambda i=i: s3.upload_file(str(weights), bucket, f"peer/{i}")))
            dl = root / f"download{i}"
            down_t.append(timed(lambda dl=dl, i=i: s3.download_file(bucket, f"peer/{i}", str(dl))))
            assert dl.stat().st_size == size
            dl.unlink()
            s3.delete_object(Bucket=bucket, Key=f"peer/{i}")
            reg = Registry.open(root / f"home{i}", blob_url=f"s3://{bucket}/run{i}")
            push_t.append(timed(lambda reg=reg: reg.push(src, "bench/big")))
            other = Registry.open(root / f"other{i}", reg.url)  # a second machine: cold cache
            pulled = root / f"pulled{i}"
            pull_t.append(timed(lambda other=other, pulled=pulled: other.pull("bench/big:1", pulled)))
            assert (pulled / weights.name).stat().st_size == size
            for k in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"run{i}/").get("Contents", [])]:
                s3.delete_object(Bucket=bucket, Key=k)
            reg.close()
            other.close()
            for d in (f"home{i}", f"other{i}", f"pulled{i}"):
                shutil.rmtree(root / d, ignore_errors=True)
            print(f"run {i + 1}: upload_file {up_t[-1]:.2f} s, push {push_t[-1]:.2f} s, "
                  f"download_file {down_t[-1]:.2f} s, pull {pull_t[-1]:.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in
               {"upload_file": up_t, "push": push_t, "download_file": down_t, "pull": pull_t}.items()}
        mb = size / (1 << 20)
        print(f"adapter file: {size / (1 << 30):.2f} GiB through moto on loopback, {args.runs} runs, medians, "
              f"{os.cpu_count()} cpus")
        for k, t in med.items():
            print(f"  {k:<13} {t:7.2f} s  {mb / t:8.0f} MiB/s")
        print(f"push throughput / upload_file   = {med['upload_file'] / med['push']:.2f}x  (target >= 0.8)")
        print(f"pull throughput / download_file = {med['download_file'] / med['pull']:.2f}x  (target >= 0.8)")
        verify_bench(root, bucket, args.blobs, args.blob_kb * 1024)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def verify_bench(root: Path, bucket: str, n: int, blob_size: int) -> None:
    """n remote blobs recorded in a store; time verify (cheap) and verify --full."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime, timezone

    from registry.api import Registry
    from registry.models import Blob

    reg = Registry.open(root / "verifyhome", blob_url=f"s3://{bucket}/verify")
    backend = reg.blobs
    files = root / "vblobs"
    files.mkdir()
    rows = []

    def put(i: int) -> None:
        data = hashlib.sha256(str(i).encode()).digest() * (blob_size // 32)
        p = files / f"{i}.bin"
        p.write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        backend.upload(p, digest, len(data))
        rows.append((digest, len(data)))
        p.unlink()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))
    with reg._write() as s, s.begin():
        now = datetime.now(timezone.utc)
        s.add_all(Blob(digest=d, size=sz, created=now) for d, sz in rows)
    total = sum(sz for _, sz in rows)
    cheap_t, full_t = [], []
    for _ in range(3):
        t = time.perf_counter()
        cheap = reg.verify()
        cheap_t.append(time.perf_counter() - t)
        assert cheap.ok and cheap.blobs == n, cheap.problems[:3]
    for _ in range(2):
        t = time.perf_counter()
        full = reg.verify(full=True)
        full_t.append(time.perf_counter() - t)
        assert full.ok, full.problems[:3]
    c, f = statistics.median(cheap_t), statistics.median(full_t)
    print(f"verify of {n} remote blobs ({total / (1 << 20):.0f} MiB): cheap {c:.2f} s, "
          f"{cheap.bytes_read} blob bytes read; --full {f:.2f} s, {full.bytes_read / (1 << 20):.0f} MiB read "
          f"(cheap/full time = {c / f:.2f})")
    reg.close()


if __name__ == "__main__":
    main()
