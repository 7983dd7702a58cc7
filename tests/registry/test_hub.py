"""The Hugging Face Hub: `--base hf:`, `import` and `publish`, through huggingface_hub.

Resolution and import run offline against a cache laid out as huggingface_hub lays it out
(tests.builders.write_hf_cache); publish runs as a dry run and as a real upload through
huggingface_hub's API to a small Hub endpoint on 127.0.0.1 (tests/hub_server.py, legacy
LFS path: Xet is disabled). huggingface_hub reads its environment once at import, so the
fixtures set both the variables (for subprocesses) and its `constants` (in-process).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from registry.api import Registry
from tests.builders import write_adapter, write_hf_cache
from tests.cli_runner import invoke, process_env
from tests.hub_server import HubServer


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def hub(monkeypatch):
    """A local Hub endpoint (HF_ENDPOINT), online, Xet off, a dummy token."""
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def _base_files(dim: int = 16) -> dict[str, bytes]:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    # both layers write_adapter targets: a push checks that the adapter fits its base
    w = {f"model.layers.{i}.self_attn.q_proj.weight": rng.standard_normal((dim, dim)).astype(np.float32)
         for i in range(2)}
    return {"model.safetensors": save(w), "config.json": b'{"model_type": "llama"}',
            "tokenizer.json": b"{}"}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _run(env_home: Path, *args) -> object:
    return invoke([*args, "--home", str(env_home)], {})


def test_base_from_the_hub_cache_records_repo_commit_and_digests(hf_cache, tmp_path):
    files = _base_files()
    commit = write_hf_cache(hf_cache, "org/base", files)
    src = write_adapter(tmp_path / "src")
    home = tmp_path / "home"
    res = _run(home, "push", src, "--name", "team/a", "--base", "hf:org/base", "--json")
    assert res.code == 0, res.err
    v = res.json()
    assert v["base_model"] == "org/base" and v["base_revision"] == commit
    show = _run(home, "show", "team/a:1")
    assert commit in show.out and "org/base" in show.out
    rec = _run(home, "show", "team/a:1", "--json").json()
    assert rec["base_files"] == {"model.safetensors": _sha(files["model.safetensors"])}
    # an explicit revision (the commit, or a branch in refs/) resolves to the same snapshot
    assert _run(home, "push", write_adapter(tmp_path / "s2", seed=2), "--name", "team/a",
                "--base", f"hf:org/base@{commit}", "--json").json()["base_revision"] == commit
    # lineage names the exact base revision
    assert f"base org/base@{commit}" in _run(home, "lineage", "team/a:1").out
    reg = Registry.open(home)
    assert reg.check_base("team/a:1", "hf:org/base") == []


def test_hub_resolution_honours_the_environment_in_a_real_process(hf_cache, tmp_path):
    commit = write_hf_cache(hf_cache, "org/base", _base_files())
    src = write_adapter(tmp_path / "src")
    env = process_env({"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}, tmp_path / "home")
    out = subprocess.run([sys.executable, "-m", "adapters_cli", "push", str(src), "--name", "p",
                          "--base", "hf:org/base", "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["base_revision"] == commit


@pytest.mark.parametrize("case", ["not-cached", "unknown-revision", "bad-id", "conflicting-name"])
def test_bad_hub_base_is_one_line_exit_2(case, hf_cache, tmp_path):
    write_hf_cache(hf_cache, "org/base", _base_files())
    home = tmp_path / "home"
    src = write_adapter(tmp_path / "src")
    arg, extra, expect = {
        "not-cached": ("hf:org/other", [], "HF_HUB_OFFLINE is set and no copy is in the Hugging Face cache"),
        "unknown-revision": ("hf:org/base@v9", [], "HF_HUB_OFFLINE is set and no copy"),
        "bad-id": ("hf:not a repo", [], "is not a Hub repo id"),
        "conflicting-name": ("hf:org/base", ["--base-model", "other/model"], "conflicts with"),
    }[case]
    res = _run(home, "push", src, "--name", "x", "--base", arg, *extra)
    assert res.code == 2
    assert len(res.err.strip().splitlines()) == 1 and expect in res.err, res.err
    assert _run(home, "list", "--json").json() == []


def test_unknown_repo_and_revision_online(hub, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    res = _run(home, "import", "hf:org/nothing", "--name", "x")
    assert res.code == 2 and "no such repo on the Hub" in res.err and len(res.err.strip().splitlines()) == 1
    hub.state.repos["org/exists"] = {"private": False, "branches": {"main": {}}}
    res = _run(home, "import", "hf:org/exists@nope", "--name", "x")
    assert res.code == 2 and "no such revision" in res.err, res.err
    assert _run(home, "list", "--json").json() == []


def test_import_records_source_and_commit_and_pulls_identical(hf_cache, tmp_path):
    src = write_adapter(tmp_path / "src", kind="mora", r=8, dim=32)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    commit = write_hf_cache(hf_cache, "someone/mora-adapter", {**files, "README.md": b"# hi"})
    home = tmp_path / "home"
    res = _run(home, "import", "hf:someone/mora-adapter", "--name", "team/m", "--tag", "prod", "--meta", "k=v",
               "--json")
    assert res.code == 0, res.err
    v = res.json()
    assert v["ref"] == "team/m:1" and v["kind"] == "mora" and v["aliases"] == ["prod"]
    assert v["meta"] == {"k": "v", "source": "hf:someone/mora-adapter", "source_revision": commit}
    out = tmp_path / "pulled"
    assert _run(home, "pull", "team/m@prod", "-o", out).code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # README.md not imported
    events = _run(home, "audit", "team/m:1", "--json").json()
    assert [e["action"] for e in events][-2:] == ["import", "pull"]
    assert events[-2]["details"]["commit"] == commit
    # the cache still holds intact blobs (hard links never alter them)
    assert _run(home, "verify").code == 0
    # not an adapter repo
    write_hf_cache(hf_cache, "org/base", _base_files())
    res = _run(home, "import", "hf:org/base", "--name", "team/b")
    assert res.code == 2 and "not a PEFT adapter repo" in res.err


def _card_meta(readme: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(readme).data.to_dict()


def test_publish_dry_run_writes_exactly_the_upload(hf_cache, tmp_path):
    files = _base_files(dim=32)
    commit = write_hf_cache(hf_cache, "org/base", files)
    src = write_adapter(tmp_path / "src", kind="mora", r=8, dim=32)
    home = tmp_path / "home"
    assert _run(home, "push", src, "--name", "team/m", "--base", "hf:org/base").code == 0
    assert _run(home, "push", write_adapter(tmp_path / "s2", kind="mora", r=8, dim=32, seed=5), "--name",
                "team/m", "--parent", "team/m:1").code == 0
    out = tmp_path / "dry"
    res = _run(home, "publish", "team/m:2", "--repo", "me/m", "--dry-run", "-o", out, "--json")
    assert res.code == 0, res.err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "s2" / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    meta = _card_meta(card)
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert commit in card and hashlib.sha256(files["model.safetensors"]).hexdigest() in card
    assert '"mora_type": 1' in card and "team/m:1" in card  # spec and lineage (the parent)
    # refused: dry run without -o, an existing non-empty folder
    assert _run(home, "publish", "team/m:2", "--repo", "me/m", "--dry-run").code == 2
    res = _run(home, "publish", "team/m:2", "--repo", "me/m", "--dry-run", "-o", out)
    assert res.code == 2 and "already exists" in res.err


def _artifact(reg, tmp_path: Path, base_commit: str, base_files: dict[str, bytes]):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    recipe = {"kind": "safetensors", "dtype": "float32", "accumulate": "float32",
              "base": {"name_or_path": None, "hub": {"repo": "org/base", "commit": base_commit},
                       "files": {"model.safetensors": _sha(base_files["model.safetensors"])}},
              "adapters": [{"ref": "team/m:1", "weight": 0.5, "kind": "mora", "from": "registry"}]}
    return reg.register_artifact(kind="safetensors", path=folder, recipe=recipe, inputs=[("team/m:1", 0.5)])


def test_publish_version_and_artifact_to_a_local_hub(hf_cache, hub, tmp_path):
    files = _base_files(dim=32)
    commit = write_hf_cache(hf_cache, "org/base", files)
    src = write_adapter(tmp_path / "src", kind="mora", r=8, dim=32)
    home = tmp_path / "home"
    assert _run(home, "push", src, "--name", "team/m", "--base", str(hf_cache / "models--org--base" /
                                                                       "snapshots" / commit),
                "--base-model", "org/base", "--base-revision", commit).code == 0
    res = _run(home, "publish", "team/m:1", "--repo", "me/mora", "--private", "--revision", "dev", "--json")
    assert res.code == 0, res.err
    summary = res.json()
    assert hub.state.unhandled == []
    repo = hub.state.repos["me/mora"]
    assert repo["private"] is True
    tree = repo["branches"]["dev"]
    assert sorted(tree) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert tree[name] == (src / name).read_bytes()
    assert _sha(tree["adapter_model.safetensors"])[7:] in hub.state.lfs  # went through LFS
    assert repo["branches"]["main"] == {}  # only the branch got the commit
    meta = _card_meta(tree["README.md"].decode())
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "adapter"
    assert summary["commit"] == hub.state.commits[-1]["oid"]
    assert [e["action"] for e in _run(home, "audit", "team/m:1", "--json").json()][-1] == "publish"
    # a merged artifact: relation "merge"; publishing to the same repo again works
    reg = Registry.open(home)
    art = _artifact(reg, tmp_path, commit, files)
    res = _run(home, "publish", art.ref, "--repo", "me/mora", "--json")
    assert res.code == 0, res.err
    main = hub.state.repos["me/mora"]["branches"]["main"]
    assert sorted(main) == ["README.md", "config.json", "model.safetensors"]
    card = main["README.md"].decode()
    meta = _card_meta(card)
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "merge"
    assert commit in card and "team/m:1" in card and "0.5" in card
    # an altered artifact is refused before anything is uploaded
    before = len(hub.state.commits)
    (tmp_path / "merged" / "config.json").write_text("{}")
    res = _run(home, "publish", art.ref, "--repo", "me/mora")
    assert res.code == 2 and "altered" in res.err and len(hub.state.commits) == before


def test_merge_on_a_hub_base_records_the_commit_and_publishes_as_merge(hf_cache, tmp_path):
    torch = pytest.importorskip("torch")
    from tests.builders import write_tensor_base

    g = torch.Generator().manual_seed(0)
    local = write_tensor_base(tmp_path / "base", {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
                                                  "model.norm.weight": torch.ones(16)})
    commit = write_hf_cache(hf_cache, "org/tiny", {p.name: p.read_bytes() for p in local.iterdir()})
    home = tmp_path / "home"
    assert _run(home, "push", write_adapter(tmp_path / "a", modules=1), "--name", "team/x",
                "--base", "hf:org/tiny").code == 0
    res = _run(home, "merge", "team/x:1", "--base", "hf:org/tiny", "--to", "safetensors", "-o", tmp_path / "merged",
               "--json")
    assert res.code == 0, res.err
    s = res.json()
    assert s["base"]["repo"] == "org/tiny" and s["base"]["commit"] == commit
    art = Registry.open(home).artifact(s["artifact"]["ref"])
    assert art.recipe["base"]["hub"] == {"repo": "org/tiny", "commit": commit}
    # the same merge from the plain folder gives the same bytes
    assert _run(home, "merge", "team/x:1", "--base", local, "--to", "safetensors", "-o", tmp_path / "ref",
                "--no-register").code == 0
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    out = tmp_path / "dry"
    assert _run(home, "publish", art.ref, "--repo", "me/merged", "--dry-run", "-o", out).code == 0
    card = (out / "README.md").read_text()
    meta = _card_meta(card)
    assert meta["base_model"] == "org/tiny" and meta["base_model_relation"] == "merge"
    # the output's own card (same writer) is replaced by the one with the store's record
    assert "README.md" in art.files and (tmp_path / "merged" / "README.md").read_text() != card
    assert f"artifact digest: `{art.digest}`" in card and "- tensors changed: 1 of 2" in card
    assert _card_meta((tmp_path / "merged" / "README.md").read_text()) == meta
    assert sorted(p.name for p in out.iterdir()) == sorted(art.files)


def test_slots_export_and_pack_on_a_hub_base(hf_cache, tmp_path):
    """`export --slots` and `pack` take `--base hf:` (the one resolver of push and merge): the
    graph's export.json and recipe name the repo and commit, `pack` finds the base again by
    that commit when the home's view is gone, and a bad Hub base is one line, exit 2."""
    import shutil

    from tests.builders import write_lora_adapter, write_model_base

    local = write_model_base(tmp_path / "base", "llama")
    commit = write_hf_cache(hf_cache, "org/tiny-llama", {p.name: p.read_bytes() for p in local.iterdir()})
    lora = write_lora_adapter(tmp_path / "lora", local, "llama", ["q_proj"], r=2)
    home = tmp_path / "home"
    assert _run(home, "push", lora, "--name", "team/l", "--base", "hf:org/tiny-llama").code == 0
    graph = tmp_path / "slots"
    res = _run(home, "export", "--base", "hf:org/tiny-llama", "--to", "onnx", "--slots", "team/l:1",
               "-o", graph, "--json")
    assert res.code == 0, res.err
    s = res.json()
    assert s["base"]["repo"] == "org/tiny-llama" and s["base"]["commit"] == commit
    recorded = json.loads((graph / "export.json").read_text())["base"]
    assert recorded["hub"] == {"repo": "org/tiny-llama", "commit": commit}
    assert recorded["files"] == {"model.safetensors": _sha((local / "model.safetensors").read_bytes())}
    art = Registry.open(home).artifact(s["artifact"]["ref"])
    assert art.recipe["base"]["hub"] == {"repo": "org/tiny-llama", "commit": commit}
    res = _run(home, "pack", "team/l:1", "--graph", graph, "-o", tmp_path / "a.onnx_adapter",
               "--base", f"hf:org/tiny-llama@{commit}", "--json")
    assert res.code == 0, res.err
    # the recorded folder (the home's view of the snapshot) is gone: found again by its commit
    shutil.rmtree(home / "hub")
    res = _run(home, "pack", "team/l:1", "--graph", graph, "-o", tmp_path / "b.onnx_adapter", "--json")
    assert res.code == 0, res.err
    assert (tmp_path / "a.onnx_adapter").read_bytes() == (tmp_path / "b.onnx_adapter").read_bytes()
    for args in (["export", "--base", "hf:org/missing", "--to", "onnx", "--slots", "team/l:1", "-o", tmp_path / "x"],
                 ["pack", "team/l:1", "--graph", graph, "-o", tmp_path / "x.onnx_adapter", "--base", "hf:org/missing"]):
        res = _run(home, *args)
        assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res.err
        assert "no copy is in the Hugging Face cache" in res.err
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.onnx_adapter").exists()


def test_a_hub_base_brings_its_module_folders_into_the_merge(hf_cache, tmp_path):
    """sentence-transformers layout on the Hub: modules.json and 1_Pooling/ reach the view and the output."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    files = {**_base_files(), "modules.json": json.dumps(modules).encode(),
             "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}', "README.md": b"# base card"}
    commit = write_hf_cache(hf_cache, "org/st", files)
    home = tmp_path / "home"
    res = _run(home, "merge", write_adapter(tmp_path / "a", modules=1), "--base", "hf:org/st", "--to", "safetensors",
               "-o", tmp_path / "merged", "--json")
    assert res.code == 0, res.err
    out = tmp_path / "merged"
    assert (out / "1_Pooling" / "config.json").read_bytes() == files["1_Pooling/config.json"]
    assert (out / "modules.json").read_bytes() == files["modules.json"]
    assert (out / "README.md").read_bytes() != files["README.md"]  # its own card, naming the Hub base
    assert _card_meta((out / "README.md").read_text())["base_model"] == "org/st"
    assert (home / "hub" / "org--st" / commit / "1_Pooling" / "config.json").is_file()
    # a second merge reuses the complete view (nothing rebuilt)
    view = home / "hub" / "org--st" / commit / "1_Pooling" / "config.json"
    before = view.stat().st_ino
    assert _run(home, "merge", tmp_path / "a", "--base", "hf:org/st", "--to", "safetensors",
                "-o", tmp_path / "merged2").code == 0
    assert view.stat().st_ino == before
