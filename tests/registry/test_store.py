"""The store through the Python API, on SQLite and PostgreSQL: versions, refs, dedupe,
aliases, listing, pull, materialize, base digests, artifacts, lineage, verify, gc."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from registry.api import Registry
from registry.errors import IntegrityError, RegistryError
from tests.builders import write_adapter
from tests.conftest import store_snapshot


def blob_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def test_push_numbers_refs_and_metadata(reg, make_adapter, registry_home):
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    v1 = reg.push(a, "team/llama-lora", base_model="meta/llama", base_revision="abc", meta=["ds=alpaca", "lr=1e-4"],
                  message="first", tags=["prod"])
    v2 = reg.push(b, "team/llama-lora", parent="team/llama-lora:1")
    assert (v1.ref, v2.ref) == ("team/llama-lora:1", "team/llama-lora:2")
    assert reg.resolve("team/llama-lora").ref == "team/llama-lora:2"
    assert reg.resolve("team/llama-lora:1").digest == v1.digest
    assert reg.resolve("team/llama-lora@prod").ref == "team/llama-lora:1"
    assert reg.resolve(f"team/llama-lora@sha256:{v2.digest[7:19]}").ref == "team/llama-lora:2"
    info = reg.resolve("team/llama-lora:1")
    assert info.meta == {"ds": "alpaca", "lr": "1e-4"}
    assert (info.base_model, info.base_revision, info.message) == ("meta/llama", "abc", "first")
    assert info.kind == "lora" and info.r == 4
    assert info.spec["kind"] == "lora" and info.spec["target_modules"] == ["q_proj"]
    assert len(info.spec["modules"]) == 2
    assert {f["path"] for f in info.files} == {"adapter_config.json", "adapter_model.safetensors"}
    for f in info.files:
        assert f["size"] == (a / f["path"]).stat().st_size
    child = reg.resolve("team/llama-lora:2")
    assert child.parent == "team/llama-lora:1"
    assert (child.base_model, child.base_revision) == ("meta/llama", "abc")  # inherited from the parent
    assert info.author and info.created.tzinfo is not None


def test_mora_recognised_as_mora(reg, make_adapter):
    v = reg.push(make_adapter("m", kind="mora", r=8, mora_type=6), "team/m")
    info = reg.resolve(v.ref)
    assert info.kind == "mora" and info.mora_type == 6 and info.r == 8
    mod = next(iter(info.spec["modules"].values()))
    assert mod["kind"] == "mora" and mod["r_hat"] == 16  # int(sqrt(32*8)+.5)=16
    assert "sqrt" in info.spec["r_hat_rule"]


def test_identical_push_answers_existing_and_stores_nothing(reg, make_adapter, registry_home):
    a = make_adapter("a")
    v1 = reg.push(a, "x")
    files = blob_files(registry_home)
    again = reg.push(a, "x", meta=["ignored=yes"])
    assert again.ref == v1.ref and again.digest == v1.digest
    assert blob_files(registry_home) == files
    assert [v.ref for v in reg.list("x")] == ["x:1"]
    # same content under another name: a new version, but the bytes are shared
    v_other = reg.push(a, "y")
    assert v_other.ref == "y:1" and v_other.digest == v1.digest
    assert blob_files(registry_home) == files
    assert not list((registry_home / "blobs" / "tmp").iterdir())


def test_list_filters_and_pagination(reg, make_adapter):
    for i in range(5):
        reg.push(make_adapter(f"a{i}", seed=i), "a" if i % 2 == 0 else "b",
                 base_model="m1" if i < 3 else "m2", meta=[f"ds={'x' if i < 2 else 'y'}"])
    reg.push(make_adapter("mora", kind="mora"), "c")
    assert [v.ref for v in reg.list()] == ["c:1", "a:3", "b:2", "a:2", "b:1", "a:1"]
    assert [v.ref for v in reg.list(limit=2)] == ["c:1", "a:3"]
    assert [v.ref for v in reg.list(limit=2, offset=2)] == ["b:2", "a:2"]
    assert [v.ref for v in reg.list("a")] == ["a:3", "a:2", "a:1"]
    assert [v.ref for v in reg.list(base_model="m2")] == ["a:3", "b:2"]
    assert [v.ref for v in reg.list(where=["ds=x"])] == ["b:1", "a:1"]
    assert [v.ref for v in reg.list(where={"ds": "y"}, base_model="m1")] == ["a:2"]
    assert [v.ref for v in reg.list(where=["kind=mora"])] == ["c:1"]
    with pytest.raises(RegistryError, match="unknown adapter 'zzz'"):
        reg.list("zzz")


def test_aliases_move_and_are_audited(reg, make_adapter):
    reg.push(make_adapter("a", seed=1), "n", tags=["prod"])
    reg.push(make_adapter("b", seed=2), "n")
    reg.tag("n:2", "prod")
    assert reg.resolve("n@prod").ref == "n:2"
    assert reg.untag("n", "prod") == "n:2"
    with pytest.raises(RegistryError, match="unknown alias 'n@prod'"):
        reg.resolve("n@prod")
    with pytest.raises(RegistryError, match="unknown alias n@prod"):
        reg.untag("n", "prod")
    moves = [(e["action"], e["details"].get("from"), e["details"].get("to")) for e in reg.events("n")
             if e["action"] in ("tag", "untag")]
    assert moves == [("tag", None, "n:1"), ("tag", "n:1", "n:2"), ("untag", "n:2", None)]


@pytest.mark.parametrize("ref, message", [
    ("nope", "unknown adapter 'nope'"),
    ("x:7", "unknown version 'x:7'"),
    ("x@staging", "unknown alias 'x@staging'"),
    ("x@sha256:abc", "at least 12 hex digits"),
    ("x@sha256:0123456789abcdef", "no version of 'x' has digest"),
    ("x@sha256:xyz0123456789", "must be hex"),
    ("x:0", "positive number"),
    ("../etc", "no leading/trailing"),
    ("artifact:99", "unknown artifact"),
])
def test_unknown_and_malformed_refs(reg, make_adapter, ref, message):
    reg.push(make_adapter(), "x")
    with pytest.raises(RegistryError, match=message):
        reg.show(ref)


def test_ambiguous_digest_prefix(reg, make_adapter):
    v1 = reg.push(make_adapter("a", seed=1), "x")
    v2 = reg.push(make_adapter("b", seed=2), "x")
    # a 12-hex collision cannot be made honestly; give version 2 a digest sharing v1's prefix
    forged = v1.digest[:19] + v2.digest[19:]
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE versions SET digest = :d WHERE id = :i"), {"d": forged, "i": v2.id})
    with pytest.raises(RegistryError, match="ambiguous"):
        reg.resolve(f"x@sha256:{v1.digest[7:19]}")
    assert reg.resolve(f"x@sha256:{v1.digest[7:]}").ref == "x:1"


def test_pull_writes_verified_peft_folder(reg, make_adapter, tmp_path):
    src = make_adapter("a", kind="mora")
    v = reg.push(src, "x")
    out = reg.pull("x", tmp_path / "out")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((out / "adapter_config.json").read_text())["use_mora"] is True
    assert reg.events(v.ref)[-1]["action"] == "pull"
    with pytest.raises(RegistryError, match="already exists"):
        reg.pull("x", tmp_path / "out")


def test_pull_refuses_corrupt_blob(reg, make_adapter, tmp_path, registry_home):
    v = reg.push(make_adapter("a"), "x")
    weights = next(f for f in reg.resolve(v.ref).files if f["path"].endswith(".safetensors"))
    blob = reg.blobs.path(weights["digest"])
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        reg.pull("x", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(IntegrityError):
        reg.materialize("x")


def test_materialize_is_cached_and_reverified(reg, make_adapter):
    src = make_adapter("a")
    reg.push(src, "x")
    p = reg.materialize("x:1")
    assert (p / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    assert reg.materialize("x:1") == p
    (p / "adapter_config.json").write_text("{}")  # damaged cache: rebuilt from verified blobs
    p2 = reg.materialize("x")
    assert (p2 / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    from mora_core.adapter import load_adapter

    assert load_adapter(p2).kind == "lora"


def _base(folder: Path, seed: int = 0) -> Path:
    """A two-shard base the `write_adapter` LoRAs fit (q_proj 16x16 in layers 0 and 1): push --base checks that."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = {f"model.layers.{i}.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float32)
             for i in range(2)}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"model.norm.weight": np.ones(16, np.float32)}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


def test_base_digests_recorded_and_checked(reg, make_adapter, tmp_path):
    base = _base(tmp_path / "base")
    v = reg.push(make_adapter("a"), "x", base_model="tiny", base_dir=base)
    info = reg.resolve(v.ref)
    assert set(info.base_files) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert reg.check_base("x", base) == []
    other = _base(tmp_path / "other", seed=1)
    problems = reg.check_base("x", other)
    assert len(problems) == 1 and "model-00001-of-00002.safetensors" in problems[0]
    # nothing recorded: nothing to compare
    reg.push(make_adapter("b", seed=5), "y")
    assert reg.check_base("y", other) == []
    with pytest.raises(RegistryError, match="no weight files"):
        reg.push(make_adapter("c", seed=6), "z", base_dir=tmp_path / "src")


def test_push_refuses_a_base_the_adapter_cannot_fit(reg, make_adapter, tmp_path, registry_home):
    """Digests of a base the adapter cannot be merged into would make every later merge fail."""
    before = store_snapshot(registry_home, reg)
    with pytest.raises(RegistryError, match=r"does not fit this base model .*q_proj"):
        reg.push(make_adapter("a", dim=24), "x", base_dir=_base(tmp_path / "base"))
    with pytest.raises(RegistryError, match=r"does not fit this base model .*matches no tensor"):
        reg.push(make_adapter("b", modules=3), "x", base_dir=_base(tmp_path / "base"))
    assert store_snapshot(registry_home, reg) == before


def test_artifacts_lineage_and_verify(reg, make_adapter, tmp_path):
    reg.push(make_adapter("a", seed=1), "p", base_model="tiny", base_revision="r1")
    reg.push(make_adapter("b", seed=2), "c", parent="p:1")
    reg.push(make_adapter("d", seed=3), "d", parent="c:1")
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"merged weights")
    (merged / "config.json").write_text("{}")
    art = reg.register_artifact(kind="safetensors", path=merged, recipe={"base": "tiny", "dtype": "float16"},
                                inputs=[("c:1", 0.5), ("p", 1.0)], report={"max_abs_err": 0.0})
    assert art.ref == "artifact:1" and art.digest.startswith("sha256:")
    shown = reg.show(art.ref).to_dict()
    assert shown["recipe"] == {"base": "tiny", "dtype": "float16"}
    assert {(i["ref"], i["weight"]) for i in shown["inputs"]} == {("c:1", 0.5), ("p:1", 1.0)}
    assert reg.show(f"artifact@sha256:{art.digest[7:21]}").id == art.id
    g = reg.lineage("c:1")
    edges = {(e["from"], e["to"], e["kind"]) for e in g["edges"]}
    assert ("p:1", "c:1", "parent") in edges and ("c:1", "d:1", "parent") in edges
    assert ("c:1", "artifact:1", "input") in edges and ("base:tiny@r1", "p:1", "base") in edges
    from registry.lineage import render

    text_out = render(g, "text")
    assert "parent p:1" in text_out and "merged into artifact:1" in text_out and "child d:1" in text_out
    assert render(g, "dot").startswith("digraph") and render(g, "mermaid").startswith("graph LR")
    assert reg.verify().ok
    (merged / "model.safetensors").write_bytes(b"tampered")
    rep = reg.verify()
    assert not rep.ok and any("artifact:1" in p and "altered" in p for p in rep.problems)
    import shutil

    shutil.rmtree(merged)
    rep = reg.verify()
    assert rep.ok and any("artifact:1" in w and "missing" in w for w in rep.warnings)
    with pytest.raises(RegistryError, match="artifact kind"):
        reg.register_artifact(kind="zip", path=tmp_path, recipe={}, inputs=[])
    with pytest.raises(RegistryError, match="unknown adapter"):
        reg.register_artifact(kind="onnx", path=tmp_path / "src", recipe={}, inputs=[("nope:1", 1.0)])


def _corrupt(reg, digest: str, how: str) -> None:
    p = reg.blobs.path(digest)
    if how == "delete":
        p.unlink()
    else:
        os.chmod(p, 0o644)
        p.write_bytes(p.read_bytes()[:-1] + b"\x00")


@pytest.mark.parametrize("how", ["alter", "delete"])
def test_verify_names_damaged_blobs(reg, make_adapter, how):
    v = reg.push(make_adapter("a"), "x")
    assert reg.verify().ok
    f = next(f for f in reg.resolve(v.ref).files if f["path"].endswith(".safetensors"))
    _corrupt(reg, f["digest"], how)
    rep = reg.verify()
    assert not rep.ok
    assert any(f["digest"] in p and "x:1" in p and ("missing" if how == "delete" else "altered") in p
               for p in rep.problems)


@pytest.mark.parametrize("tamper, expect", [
    ("UPDATE audit_events SET details = '{\"digest\":\"forged\"}' WHERE seq = 2", "audit event 2"),
    ("DELETE FROM audit_events WHERE seq = 2", "audit events 2..2 were deleted"),
    ("DELETE FROM audit_events WHERE seq = 4", "newest events were deleted"),
    ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 1", "audit event 1"),
])
def test_verify_detects_audit_tampering(reg, make_adapter, tamper, expect):
    reg.push(make_adapter("a", seed=1), "x", tags=["prod"])
    reg.push(make_adapter("b", seed=2), "x")
    reg.audit("merge", "x:2", {"to": "somewhere"})
    assert [e["seq"] for e in reg.events()] == [1, 2, 3, 4]
    assert reg.verify().ok
    with reg.engine.begin() as conn:
        conn.execute(text(tamper))
    rep = reg.verify()
    assert not rep.ok and any(expect in p for p in rep.problems), rep.problems


def test_delete_then_gc_frees_bytes(reg, make_adapter, registry_home):
    a = make_adapter("a", seed=1)
    reg.push(a, "x")
    reg.push(make_adapter("b", seed=2), "x", tags=["prod"])
    assert reg.gc().bytes_freed == 0
    weights = (a / "adapter_model.safetensors").stat().st_size
    n_blobs = len(blob_files(registry_home))  # two weights files, one shared config
    assert n_blobs == 3
    assert reg.delete("x:1") == "x:1"
    dry = reg.gc(dry_run=True)
    assert dry.bytes_freed == weights and len(dry.blobs) == 1
    assert len(blob_files(registry_home)) == n_blobs  # dry run removed nothing
    rep = reg.gc()
    assert rep.blobs == dry.blobs and rep.bytes_freed == dry.bytes_freed
    assert len(blob_files(registry_home)) == n_blobs - 1
    assert reg.verify().ok
    assert [e["action"] for e in reg.events()][-2:] == ["delete", "gc"]
    assert reg.push(a, "x").ref == "x:3"  # numbers are never reused
    reg.push(make_adapter("c", seed=3), "child", parent="x:3")
    with pytest.raises(RegistryError, match="derive"):
        reg.delete("x:3")


def test_bad_inputs_leave_store_unchanged(reg, make_adapter, registry_home, tmp_path):
    reg.push(make_adapter("ok"), "x", tags=["prod"])
    before = store_snapshot(registry_home, reg)
    bad = make_adapter("nan")
    cfg = bad / "adapter_config.json"
    cfg.write_text("{not json")
    with pytest.raises(RegistryError, match="adapter_config.json: is not valid JSON"):
        reg.push(bad, "x")
    with pytest.raises(RegistryError, match="adapter name"):
        reg.push(make_adapter("ok"), "../escape")
    with pytest.raises(RegistryError, match="unknown adapter"):
        reg.push(make_adapter("ok"), "x", parent="nope:1")
    with pytest.raises(RegistryError, match="metadata key"):
        reg.push(make_adapter("ok"), "x", meta=["bad key=1"])
    assert store_snapshot(registry_home, reg) == before


def test_open_uses_env_and_upgrades_itself(tmp_path, monkeypatch, make_adapter):
    monkeypatch.setenv("ADAPTERS_HOME", str(tmp_path / "envhome"))
    monkeypatch.delenv("ADAPTERS_DB_URL", raising=False)
    r = Registry.open()
    assert r.home == tmp_path / "envhome" and (tmp_path / "envhome" / "registry.db").is_file()
    r.push(make_adapter("a"), "x")
    r.close()
    with Registry.open(tmp_path / "envhome") as again:
        assert again.resolve("x").ref == "x:1"
    _ = write_adapter
