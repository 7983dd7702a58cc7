"""`adapters batch`: plans of merges on the local executor and on a real local Ray, cached by input digests."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.builders import (
    linear_shapes,
    llama_like,
    mora_shapes,
    write_model_base,
    write_mora_adapter,
    write_tensor_base,
)
from tests.cli_runner import invoke, run_adapters


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


JOBS = [
    {"name": "a", "adapters": ["team/m1"], "output": "out/a"},
    {"name": "b", "adapters": ["team/m1", "m6"], "weights": [1, 0.5], "output": "out/b"},
    {"name": "c", "adapters": ["m6"], "dtype": "float32", "output": "out/c"},
    {"name": "d", "adapters": ["team/m1"], "max_shard_size": "40KB", "accumulate": "float64", "output": "out/d"},
]


def _inputs(root: Path, home: Path) -> None:
    """A sharded bf16 base and two MoRA folders under `root`; m1 pushed as team/m1 into `home`."""
    import torch

    write_tensor_base(root / "base", llama_like(dtype=torch.bfloat16), shards=2)
    write_mora_adapter(root / "m1", mora_shapes(), mora_type=1, seed=1)
    write_mora_adapter(root / "m6", mora_shapes(), mora_type=6, r=4, seed=2)
    r = invoke(["push", root / "m1", "--name", "team/m1", "--base", root / "base"], {"ADAPTERS_HOME": str(home)})
    assert r.code == 0, r.err


@pytest.fixture(scope="module")
def singles(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Each job of the plan as a single `adapters merge` (not registered): the bit-for-bit reference."""
    root = tmp_path_factory.mktemp("singles")
    env = {"ADAPTERS_HOME": str(root / "home")}
    _inputs(root, root / "home")
    out = {}
    for job in JOBS:
        args = ["merge", *[a if a.startswith("team/") else root / a for a in job["adapters"]],
                "--base", root / "base", "--to", "safetensors", "-o", root / job["name"], "--no-register"]
        for w in job.get("weights", []):
            args += ["--weight", w]
        for opt in ("dtype", "accumulate"):
            if opt in job:
                args += [f"--{opt}", job[opt]]
        if "max_shard_size" in job:
            args += ["--max-shard-size", job["max_shard_size"]]
        r = invoke(args, env)
        assert r.code == 0, r.err
        out[job["name"]] = _tree(root / job["name"])
    return out


@pytest.fixture
def world(tmp_path, singles):
    """The same inputs in a fresh store, and the plan of JOBS."""
    import yaml

    home = tmp_path / "home"
    _inputs(tmp_path, home)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"defaults": {"base": "base", "to": "safetensors"}, "jobs": JOBS}))
    return {"root": tmp_path, "home": home, "plan": plan, "singles": singles}


def _batch(world, *extra, env=None, **kw):
    return run_adapters(["batch", world["plan"], "--json", *extra], home=world["home"], env=env, timeout=600, **kw)


def _by_name(p) -> dict[str, dict]:
    assert p.returncode in (0, 1), p.stderr
    return {j["name"]: j for j in json.loads(p.stdout)["jobs"]}


def _check_outputs(world) -> None:
    for name, expected in world["singles"].items():
        assert _tree(world["root"] / "out" / name) == expected, name


def test_local_plan_equals_single_merges_then_is_cached(world):
    first = _by_name(_batch(world, "--max-parallel", "2"))
    assert {n: j["status"] for n, j in first.items()} == dict.fromkeys("abcd", "done")
    assert all(j["artifact"].startswith("artifact:") and j["key"].startswith("sha256:") for j in first.values())
    assert all(j["worker"].rsplit(":", 1)[1].isdigit() and j["seconds"] >= 0 for j in first.values())
    _check_outputs(world)
    before = {n: _stats(world["root"] / "out" / n) for n in "abcd"}
    second = _by_name(_batch(world))
    assert {n: j["status"] for n, j in second.items()} == dict.fromkeys("abcd", "cached")
    assert {n: j["key"] for n, j in second.items()} == {n: j["key"] for n, j in first.items()}
    assert {n: j["artifact"] for n, j in second.items()} == {n: j["artifact"] for n, j in first.items()}
    assert {n: _stats(world["root"] / "out" / n) for n in "abcd"} == before  # nothing rewritten
    # lineage: the registered artifact of job a is a child of team/m1:1
    p = run_adapters(["lineage", "team/m1", "--format", "json"], home=world["home"])
    assert first["a"]["artifact"] in {n["id"] for n in json.loads(p.stdout)["nodes"]}


def test_changed_input_reruns_only_its_jobs_and_altered_output_is_redone(world):
    assert set(j["status"] for j in _by_name(_batch(world)).values()) == {"done"}
    write_mora_adapter(world["root"] / "m6", mora_shapes(), mora_type=6, r=4, seed=3)  # new content
    shard = next((world["root"] / "out" / "a").glob("*.safetensors"))
    os.chmod(shard, 0o644)
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")  # someone altered job a's output
    again = _by_name(_batch(world))
    assert {n: j["status"] for n, j in again.items()} == {"a": "done", "b": "done", "c": "done", "d": "cached"}
    assert _tree(world["root"] / "out" / "a") == world["singles"]["a"]  # replaced by a good one


def test_killed_job_runs_again_on_the_next_run(world):
    env = {"ADAPTERS_CRASH_AT": "batch_job", "ADAPTERS_CRASH_JOB": "c"}
    p = _batch(world, "--max-parallel", "1", env=env, start_new_session=True)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert not (world["root"] / "out" / "c").exists()
    again = _by_name(_batch(world))
    assert again["c"]["status"] == "done" and again["a"]["status"] == "cached" and again["b"]["status"] == "cached"
    assert again["d"]["status"] in ("done", "cached")
    _check_outputs(world)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["jobs"][1].update(weights=[1]), "job 2 (b): 2 adapters but 1 --weight values"),
    (lambda d: d["jobs"][0].update(colour="red"), "job 1 (a): unknown field 'colour'"),
    (lambda d: d["jobs"][2].update(adapters=["team/nope"]), "job 3 (c): field 'adapters': team/nope"),
    (lambda d: d["jobs"][3].update(max_shard_size="-5"), "job 4 (d): field 'max_shard_size'"),
    (lambda d: d["jobs"][3].update(output="out/a"), "job 4 (d): field 'output'"),
    (lambda d: d["jobs"][0].pop("output"), "job 1 (a): field 'output' is missing"),
    (lambda d: d["jobs"][0].update(to="gguf"), "job 1 (a): field 'to'"),
    (lambda d: d["jobs"][0].update(weights=[float("nan")]), "job 1 (a): field 'weights'"),
])
def test_bad_plan_is_refused_before_anything_runs(world, edit, message):
    import yaml

    doc = yaml.safe_load(world["plan"].read_text())
    edit(doc)
    world["plan"].write_text(yaml.safe_dump(doc))
    p = _batch(world)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert not (world["root"] / "out").exists()


def test_output_not_written_by_batch_is_not_replaced(world):
    (world["root"] / "out" / "b").mkdir(parents=True)
    (world["root"] / "out" / "b" / "mine.txt").write_text("keep me")
    jobs = _by_name(_batch(world))
    assert jobs["b"]["status"] == "failed" and "not written by adapters batch" in jobs["b"]["error"]
    assert {jobs[n]["status"] for n in "acd"} == {"done"}
    assert (world["root"] / "out" / "b" / "mine.txt").read_text() == "keep me"


def test_ray_executor_equals_single_merges(world):
    pytest.importorskip("ray")
    jobs = _by_name(_batch(world, "--executor", "ray", "--max-parallel", "2"))
    assert {n: j["status"] for n, j in jobs.items()} == dict.fromkeys("abcd", "done")
    assert len({j["worker"] for j in jobs.values()}) >= 1
    _check_outputs(world)
    assert {j["status"] for j in _by_name(_batch(world, "--executor", "ray")).values()} == {"cached"}


def test_onnx_job_in_a_plan(tmp_path):
    base = write_model_base(tmp_path / "base", "llama")
    write_mora_adapter(tmp_path / "m", linear_shapes("llama"), mora_type=6, seed=1, scale=0.05)
    (tmp_path / "plan.json").write_text(json.dumps({"jobs": [
        {"adapters": ["m"], "base": "base", "to": "onnx", "output": "onnx-out", "provider": "cpu"},
        {"adapters": ["m"], "base": "base", "to": "safetensors", "output": "st-out"}]}))
    p = run_adapters(["batch", tmp_path / "plan.json", "--json"], home=tmp_path / "home", timeout=600)
    jobs = json.loads(p.stdout)["jobs"]
    assert p.returncode == 0 and [j["status"] for j in jobs] == ["done", "done"], p.stderr
    assert (tmp_path / "onnx-out" / "model.onnx").is_file() and base.is_dir()
    p = run_adapters(["batch", tmp_path / "plan.json"], home=tmp_path / "home")
    assert p.returncode == 0 and p.stdout.strip().endswith("2 jobs: 0 done, 2 cached, 0 failed"), p.stdout


def test_two_runs_of_one_plan_at_once_never_do_a_job_twice(world):
    import subprocess

    from tests.cli_runner import ENTRY, process_env

    env = process_env(home=world["home"])
    runs = [subprocess.Popen([*ENTRY, "batch", str(world["plan"]), "--json", "--max-parallel", "2"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in runs]
    assert all(p.returncode == 0 for p in runs), [o[1] for o in outs]
    statuses = [{j["name"]: j["status"] for j in json.loads(o[0])["jobs"]} for o in outs]
    for name in "abcd":
        assert sorted(s[name] for s in statuses) == ["cached", "done"], statuses
    registered = [e for e in json.loads(run_adapters(["audit", "--json"], home=world["home"]).stdout)
                  if e["action"] == "register"]
    assert len(registered) == 4
    _check_outputs(world)
