"""Blobs in S3: push/pull of a ~1 GiB adapter vs boto3's own transfer of the same bytes, and
`verify` of 1,000 remote blobs (cheap and --full), through moto's S3 server on loopback.

    python bench/bench_s3.py [--gb 1.0] [--runs 3] [--blobs 1000] [--blob-kb 256] [--dir DIR]
                             [--skip-transfer] [--skip-pull] [--skip-verify] [--start-timeout 120]

The server runs in its own process (`python -m moto.server`, 127.0.0.1), so client and
server do not share a GIL. Peers, alternated with ours in every run:
- `upload_file`: boto3's `upload_file` of the adapter file to another key (its defaults:
  8 MiB parts, 10 threads);
- `download_file`: boto3's `download_file` of that object to a fresh file.
`push` is `Registry.push` into a fresh store bound to a fresh prefix (bound, and its S3
client made, before the clock starts, as the peer's client is: once per store, not per
push): hash, HEAD, upload with SHA-256 part checksums beside the adapter's validation, a
conditional complete, database commit; `pull` is `Registry.pull` into a fresh folder with a cold read
cache (parallel ranged GETs hashed in order, fsync, then a copy into the read cache).
Targets: push and pull throughput >= 0.8x the peer's.

Verify: `--blobs` blobs of `--blob-kb` KiB each are uploaded through the backend (16
parallel PUTs, progress printed) and recorded, then `verify` (cheap: one HEAD per blob, 16
in flight) and `verify --full` (every byte re-read and re-hashed) are timed; prints seconds
and blob bytes read. Every phase prints the 1-minute load average when it ends (the machines
are shared: read the ratios with it). The moto server gets `--start-timeout` seconds to
answer (its import alone takes tens of seconds on a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import resource
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
from bench_registry_push import make_adapter  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(root: Path, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process; returns once it answers HTTP (or exits the bench)."""
    import urllib.request

    port = free_port()
    env = {**os.environ, "TMPDIR": str(root)}  # moto spools large objects to temp files
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"moto server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5):
                return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"moto server did not answer within {timeout_s:.0f} s (load {os.getloadavg()[0]:.1f})")


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--blobs", type=int, default=1000)
    ap.add_argument("--blob-kb", type=int, default=256)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--skip-transfer", action="store_true", help="only the verify figure")
    ap.add_argument("--skip-verify", action="store_true", help="only the push/pull figures")
    ap.add_argument("--skip-pull", action="store_true",
                    help="push vs upload_file only (moto serves ranged GETs of a 1 GiB object slowly: minutes)")
    ap.add_argument("--start-timeout", type=float, default=120.0, help="seconds moto's server gets to answer")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    print(f"{os.cpu_count()} cpus, {load()} at the start", flush=True)
    proc, endpoint = start_moto(root, args.start_timeout)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        s3 = boto3.client("s3")
        bucket = "bench-adapters"
        s3.create_bucket(Bucket=bucket)
        if not args.skip_transfer:
            transfer_bench(root, s3, bucket, args.gb, args.runs, proc.pid, pull=not args.skip_pull)
        if not args.skip_verify:
            verify_bench(root, bucket, args.blobs, args.blob_kb * 1024)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process (all its threads), or of process `pid`."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def transfer_bench(root: Path, s3, bucket: str, gb: float, runs: int, server_pid: int,
                   pull: bool = True) -> None:
    """Push/pull of a ~`gb` GiB adapter vs boto3's upload_file/download_file, alternated.
    Wall time, and the CPU seconds of the client (this process) and of the server, per
    contender: on a loaded machine the CPU seconds are the steadier comparison."""
    from registry.api import Registry

    src = make_adapter(root / "adapter", gb)
    weights = src / "adapter_model.safetensors"
    size = weights.stat().st_size
    warm = make_adapter(root / "warm", 0.001)
    Registry.open(root / "warmhome", blob_url=f"s3://{bucket}/warm").push(warm, "warm")  # torch import
    weights.read_bytes()  # page cache warm for both contenders
    names = ["upload_file", "push"] + (["download_file", "pull"] if pull else [])
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in names}

    def measure(name: str, fn) -> None:
        c0, s0, t0 = cpu_seconds(), cpu_seconds(server_pid), time.perf_counter()
        fn()
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append((cpu_seconds() - c0, cpu_seconds(server_pid) - s0))

    for i in range(runs):
        measure("upload_file", lambda i=i: s3.upload_file(str(weights), bucket, f"peer/{i}"))
        if pull:
            dl = root / f"download{i}"
            measure("download_file", lambda dl=dl, i=i: s3.download_file(bucket, f"peer/{i}", str(dl)))
            assert dl.stat().st_size == size
            dl.unlink()
        s3.delete_object(Bucket=bucket, Key=f"peer/{i}")
        reg = Registry.open(root / f"home{i}", blob_url=f"s3://{bucket}/run{i}")
        assert reg.blobs.remote  # bind the fresh store to its prefix and make its client (once per store, untimed)
        measure("push", lambda reg=reg: reg.push(src, "bench/big"))
        other = Registry.open(root / f"other{i}", reg.url)  # a second machine: cold cache
        if pull:
            pulled = root / f"pulled{i}"
            measure("pull", lambda other=other, pulled=pulled: other.pull("bench/big:1", pulled))
            assert (pulled / weights.name).stat().st_size == size
        for k in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"run{i}/").get("Contents", [])]:
            s3.delete_object(Bucket=bucket, Key=k)
        reg.close()
        other.close()
        for d in (f"home{i}", f"other{i}", f"pulled{i}"):
            shutil.rmtree(root / d, ignore_errors=True)
        print(f"run {i + 1}: " + ", ".join(f"{k} {wall[k][-1]:.2f} s" for k in names) + f" ({load()})", flush=True)
    mb = size / (1 << 20)
    print(f"adapter file: {size / (1 << 30):.2f} GiB through moto on loopback, {runs} runs, medians, "
          f"{os.cpu_count()} cpus, {load()}")
    print(f"  {'':<13} {'wall':>8} {'MiB/s':>8} {'client CPU':>11} {'server CPU':>11}")
    med = {k: statistics.median(v) for k, v in wall.items()}
    cpu_med = {k: (statistics.median(c for c, _ in v), statistics.median(s for _, s in v)) for k, v in cpu.items()}
    for k in names:
        print(f"  {k:<13} {med[k]:7.2f}s {mb / med[k]:8.0f} {cpu_med[k][0]:10.2f}s {cpu_med[k][1]:10.2f}s")
    for ours, peer in (("push", "upload_file"), ("pull", "download_file")):
        if ours not in wall:
            continue
        paired = statistics.median(p / o for p, o in zip(wall[peer], wall[ours]))
        cpu_ratio = sum(cpu_med[peer]) / sum(cpu_med[ours])
        print(f"{ours} throughput / {peer:<13} = {med[peer] / med[ours]:.2f}x  (target >= 0.8; median of "
              f"per-run ratios {paired:.2f}x; CPU seconds client+server {peer}/{ours} {cpu_ratio:.2f}x)")
    sys.stdout.flush()


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

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:  # parallel PUTs; progress so a slow server is visible
        for done, _ in enumerate(pool.map(put, range(n)), 1):
            if done % max(1, n // 5) == 0:
                print(f"  created {done}/{n} blobs in {time.perf_counter() - t0:.1f} s ({load()})", flush=True)
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
    print(f"verify of {n} remote blobs ({total / (1 << 20):.0f} MiB), medians of {len(cheap_t)} and "
          f"{len(full_t)} runs: cheap {c:.2f} s, {cheap.bytes_read} blob bytes read; --full {f:.2f} s, "
          f"{full.bytes_read / (1 << 20):.0f} MiB read (cheap/full time = {c / f:.2f}; {load()})", flush=True)
    reg.close()


if __name__ == "__main__":
    main()
