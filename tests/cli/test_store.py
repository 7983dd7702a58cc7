"""The `adapters` registry commands end to end (in-process click runner, real store),
bad input (one error line, exit 1, store unchanged) and the no-torch import contract."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from registry.db import SCHEMA_HEAD
from tests.conftest import store_snapshot


def test_session_push_list_show_tag_lineage_pull(run_cli, make_adapter, tmp_path, reg):
    r = run_cli("push", make_adapter("a", seed=1), "--name", "team/x", "--base-model", "tiny", "--meta", "ds=a",
                "--tag", "prod", "-m", "first")
    assert (r.code, r.out.strip(), r.err) == (0, "team/x:1", "")
    r = run_cli("push", make_adapter("b", seed=2, kind="mora"), "--name", "team/y", "--parent", "team/x@prod",
                "--json")
    assert r.code == 0 and r.json()["ref"] == "team/y:1" and r.json()["parent"] == "team/x:1"
    assert r.json()["kind"] == "mora"
    r = run_cli("list")
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["REF", "KIND", "DIGEST"]
    assert [ln.split()[0] for ln in lines[1:]] == ["team/y:1", "team/x:1"]
    assert lines[0].index("KIND") == lines[1].index("mora")  # aligned columns
    rows = run_cli("list", "--json", "--where", "ds=a").json()
    assert [v["ref"] for v in rows] == ["team/x:1"] and rows[0]["aliases"] == ["prod"]
    assert run_cli("list", "--json", "--limit", "1").json()[0]["ref"] == "team/y:1"
    show = run_cli("show", "team/x", "--json").json()
    assert show["message"] == "first" and show["spec"]["kind"] == "lora" and len(show["files"]) == 2
    assert "digest:" in run_cli("show", "team/x:1").out
    assert run_cli("tag", "team/y:1", "staging").out.strip() == "team/y@staging -> team/y:1"
    assert run_cli("untag", "team/y", "staging", "--json").json() == {"alias": "team/y@staging", "was": "team/y:1"}
    text = run_cli("lineage", "team/x:1").out
    assert "base tiny" in text and "child team/y:1" in text
    g = run_cli("lineage", "team/x:1", "--format", "json").json()
    assert {(e["from"], e["to"]) for e in g["edges"]} >= {("team/x:1", "team/y:1")}
    assert run_cli("lineage", "team/y", "--format", "dot").out.startswith("digraph")
    assert "-->" in run_cli("lineage", "team/y", "--format", "mermaid").out
    r = run_cli("pull", "team/y", "-o", tmp_path / "pulled", "--json")
    assert r.code == 0 and Path(r.json()["path"]).joinpath("adapter_model.safetensors").is_file()
    r = run_cli("verify")
    assert r.code == 0 and r.out.startswith("ok:")
    events = run_cli("audit", "--json").json()
    assert [e["action"] for e in events] == ["push", "tag", "push", "tag", "untag", "pull"]
    assert [e["action"] for e in run_cli("audit", "team/y:1", "--json").json()] == ["push", "tag", "untag", "pull"]
    assert "ACTION" in run_cli("audit").out
    assert run_cli("gc", "--json").json()["bytes_freed"] == 0
    assert run_cli("gc", "--dry-run").out.startswith("would free 0 B")
    assert run_cli("rm", "team/y:1").out.strip() == "deleted team/y:1"
    assert run_cli("gc", "--json").json()["bytes_freed"] > 0
    assert run_cli("db", "upgrade").out.strip() == f"schema already at {SCHEMA_HEAD}"


def test_verify_exit_code_on_damage(run_cli, make_adapter, reg):
    run_cli("push", make_adapter("a"), "--name", "x")
    f = next(f for f in reg.resolve("x").files if f["path"] == "adapter_model.safetensors")
    p = reg.blobs.path(f["digest"])
    os.chmod(p, 0o644)
    p.write_bytes(b"evil")
    r = run_cli("verify")
    assert r.code == 1 and "PROBLEM: blob" in r.out and "x:1" in r.out and r.out.splitlines()[-1].startswith("DAMAGED")
    j = run_cli("verify", "--json")
    assert j.code == 1 and j.json()["ok"] is False


def _weights(folder: Path) -> Path:
    return folder / "adapter_model.safetensors"


def _rewrite_tensor(folder: Path, key_part: str, fn) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    t = load_file(str(_weights(folder)))
    for k in list(t):
        if key_part in k:
            t[k] = fn(np.array(t[k]))
            break
    save_file(t, str(_weights(folder)))


def _nan(a):
    a[0, 0] = float("nan")
    return a


def _inf(a):
    a[0, 0] = float("inf")
    return a


def _bump(a):
    a[0, 0] += 1
    return a


BAD = {
    "missing config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json: not found"),
    "malformed config": (lambda f: (f / "adapter_config.json").write_text("{oops"), "is not valid JSON"),
    "config not peft": (lambda f: (f / "adapter_config.json").write_text('{"a": 1}'), "no peft_type"),
    "truncated safetensors": (lambda f: _weights(f).write_bytes(_weights(f).read_bytes()[:200]), "truncated"),
    "corrupt header": (lambda f: _weights(f).write_bytes(struct.pack("<Q", 40) + b"\xff" * 40 + b"\0" * 64),
                       "header is not valid JSON"),
    "header claims gigabytes": (lambda f: _weights(f).write_bytes(struct.pack("<Q", 5 << 30) + b"{}" * 10),
                                "header claims 5368709120 bytes"),
    "lora rank mismatch": (lambda f: _rewrite_tensor(f, "lora_B", lambda a: a[:, :3].copy()), "do not share a rank"),
    "nan weights": (lambda f: _rewrite_tensor(f, "lora_A", _nan), "NaN or Inf"),
    "inf weights": (lambda f: _rewrite_tensor(f, "lora_B", _inf), "NaN or Inf"),
    "pickle checkpoint": (lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x04pickle"), "pickle checkpoints are refused"),
    "pickle only": (lambda f: (_weights(f).rename(f / "adapter_model.bin")), "pickle checkpoints are refused"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_refused_store_unchanged(case, run_cli, make_adapter, reg, registry_home):
    run_cli("push", make_adapter("good", seed=9), "--name", "x", "--tag", "prod")
    before = store_snapshot(registry_home, reg)
    folder = make_adapter("bad")
    mutate, message = BAD[case]
    mutate(folder)
    r = run_cli("push", folder, "--name", "x")
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.err
    assert str(folder) in lines[0]
    assert "Traceback" not in r.err
    assert store_snapshot(registry_home, reg) == before


def test_mora_copies_differ_refused(run_cli, make_adapter, reg, registry_home):
    run_cli("push", make_adapter("good", seed=9), "--name", "x")
    before = store_snapshot(registry_home, reg)
    folder = make_adapter("bad", kind="mora")
    _rewrite_tensor(folder, "lora_B", _bump)
    r = run_cli("push", folder, "--name", "x")
    assert r.code == 2 and "MoRA's two copies" in r.err and len(r.err.strip().splitlines()) == 1
    assert store_snapshot(registry_home, reg) == before


@pytest.mark.parametrize("name", ["../x", "/abs", "Team/X", "a//b", "a/../b", "a/./b", "x y", "artifact", "x/", "-x", "é", "x" * 201])
def test_invalid_names_refused(name, run_cli, make_adapter, reg, registry_home):
    src = make_adapter("a")
    before = store_snapshot(registry_home, reg)
    tree = sorted(registry_home.parent.rglob("*"))  # the test's whole temp folder: home, sources, siblings
    r = run_cli("push", src, "--name", name)
    assert r.code == 2 and r.err.startswith("error: adapter name") and len(r.err.strip().splitlines()) == 1
    assert store_snapshot(registry_home, reg) == before
    assert sorted(registry_home.parent.rglob("*")) == tree  # nothing written anywhere, in or beside the home


@pytest.mark.parametrize("args, message", [
    (["pull", "nope"], "unknown adapter 'nope'"),
    (["show", "x:9"], "unknown version 'x:9'"),
    (["tag", "nope", "prod"], "unknown adapter 'nope'"),
    (["tag", "x", "Bad Alias"], "alias 'Bad Alias'"),
    (["untag", "x", "nope"], "unknown alias x@nope"),
    (["lineage", "x@sha256:12"], "at least 12 hex digits"),
    (["audit", "nope:1"], "unknown adapter"),
    (["push", "/nonexistent/folder", "--name", "x"], "/nonexistent/folder: not an adapter folder"),
    (["push", "{src}", "--name", "x", "--meta", "novalue"], "expected KEY=VALUE"),
    (["list", "--where", "kind"], "expected KEY=VALUE"),
    (["rm", "x:5"], "unknown version"),
])
def test_user_mistakes_one_line(args, message, run_cli, make_adapter, reg, registry_home):
    src = make_adapter("a")
    run_cli("push", src, "--name", "x")
    before = store_snapshot(registry_home, reg)
    r = run_cli(*[a.replace("{src}", str(src)) for a in args])
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and message in r.err, r.err
    assert store_snapshot(registry_home, reg) == before


def test_registry_imports_no_torch():
    code = ("import registry.api, adapters_cli.main, adapters_cli.store, registry.lineage, sys; "
            "bad = {'torch', 'transformers', 'alembic', 'peft'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_list_process_imports_no_heavy_modules(run_cli, make_adapter, store_env, reg):
    run_cli("push", make_adapter("a"), "--name", "x")
    code = ("import sys; from adapters_cli.main import main; rc = main(['list', '--json']); "
            "bad = {'torch', 'transformers', 'alembic', 'mora_core.adapter', 'numpy'} & set(sys.modules); "
            "assert rc == 0 and not bad, (rc, bad)")
    out = subprocess.run([sys.executable, "-c", code], env=store_env, check=True, capture_output=True, text=True)
    assert json.loads(out.stdout)[0]["ref"] == "x:1"
