"""`adapters list --json` over a store holding 10,000 versions, against the import floor.

    python bench/bench_registry_list.py [--versions 10000] [--runs 15]

Floor: a process that only runs `import sqlalchemy.orm, click`. Target: the whole
`adapters list --json` process at most 0.15 s slower than the floor, measured in the
same run (interleaved; medians and best-of reported). Also times `list NAME` and `list --where`.

The store is seeded with a few real pushes, then bulk rows shaped exactly like them
(same spec text, files pointing at real blobs, metadata rows) to reach the count fast.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def seed(home: Path, versions: int) -> None:
    from sqlalchemy import insert, select

    from registry.api import Registry
    from registry.models import Name, Version, VersionFile, VersionMeta
    from tests.builders import write_adapter

    reg = Registry.open(home)
    for i in range(4):
        reg.push(write_adapter(home.parent / f"src{i}", seed=i), f"team/model-{i}", base_model="tiny",
                 meta=[f"ds=set{i % 3}"])
    with reg._read() as s:
        proto = s.scalars(select(Version).limit(1)).one()
        files = s.scalars(select(VersionFile).where(VersionFile.version_id == proto.id)).all()
        cols = {c.name: getattr(proto, c.key) for c in Version.__table__.columns if c.name != "id"}
        file_rows = [(f.path, f.blob, f.size) for f in files]
    names = 100
    per_name = -(-(versions - 4) // names)  # ceil: at least `versions` in all
    with reg._write() as s, s.begin():
        name_ids = []
        for n in range(names):
            nm = Name(name=f"bulk/adapter-{n:03d}", latest=per_name, created=cols["created"])
            s.add(nm)
            s.flush()
            name_ids.append(nm.id)
        vid = s.scalar(select(Version.id).order_by(Version.id.desc()).limit(1))
        vrows, frows, mrows = [], [], []
        for k in range(per_name):
            for n, nid in enumerate(name_ids):
                vid += 1
                vrows.append(dict(cols, id=vid, name_id=nid, number=k + 1,
                                  digest="sha256:" + f"{vid:064x}", base_model=f"base-{n % 5}"))
                frows.extend({"version_id": vid, "path": p, "blob": b, "size": sz} for p, b, sz in file_rows)
                mrows.append({"version_id": vid, "key": "ds", "value": f"set{vid % 7}"})
        s.execute(insert(Version), vrows)
        s.execute(insert(VersionFile), frows)
        s.execute(insert(VersionMeta), mrows)
    reg.close()


def run(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"{cmd}: exit {p.returncode}: {p.stderr.strip()}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-list-"))
    try:
        home = root / "home"
        seed(home, args.versions)
        env = dict(os.environ, ADAPTERS_HOME=str(home))
        env.pop("ADAPTERS_DB_URL", None)
        adapters = shutil.which("adapters") or ""
        cli = [adapters] if adapters else [sys.executable, "-m", "adapters_cli"]
        out = subprocess.run([*cli, "list", "--json", "--limit", "0"], env=env, check=True,
                             capture_output=True, text=True).stdout
        import json

        total = len(json.loads(out))
        cases = {
            "floor": [sys.executable, "-c", "import sqlalchemy.orm, click"],
            "list --json": [*cli, "list", "--json"],
            "list NAME --json": [*cli, "list", "bulk/adapter-042", "--json"],
            "list --where --json": [*cli, "list", "--where", "ds=set3", "--base-model", "base-2", "--json"],
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for cmd in cases.values():  # warm-up (page cache, .pyc)
            run(cmd, env)
        for _ in range(args.runs):
            for k, cmd in cases.items():
                times[k].append(run(cmd, env))
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        print(f"store: {total} versions; {args.runs} interleaved runs, {os.cpu_count()} cpus")
        print(f"  {'':<22} {'median':>8} {'best':>8}")
        for k in cases:
            extra = "" if k == "floor" else (f"   floor + {med[k] - med['floor']:.3f} s (median), "
                                              f"+ {best[k] - best['floor']:.3f} s (best)")
            print(f"  {k:<22} {med[k]:7.3f}s {best[k]:7.3f}s{extra}")
        probe = ("import sys, time; import sqlalchemy.orm, click; t = time.perf_counter(); "
                 "from adapters_cli.main import main; main(['list', '--json']); "
                 "print(time.perf_counter() - t, file=sys.stderr)")
        inc = []
        for _ in range(args.runs):
            p = subprocess.run([sys.executable, "-c", probe], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, check=True)
            inc.append(float(p.stderr.strip().splitlines()[-1]))
        print(f"  in-process cost of `list --json` after the floor's imports: median {statistics.median(inc):.3f} s, "
              f"best {min(inc):.3f} s (less sensitive to machine load)")
        print(f"list --json - floor = {med['list --json'] - med['floor']:.3f} s median, "
              f"{best['list --json'] - best['floor']:.3f} s best  (target <= 0.150)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
