"""`adapters merge` with registry references: materialised from the store, refused on a base
whose digests differ from those recorded at push, and registered as an artifact in the lineage."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def _base(folder: Path, seed: int) -> Path:
    from tests.builders import write_tensor_base

    g = torch.Generator().manual_seed(seed)
    return write_tensor_base(folder, {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
                               "model.norm.weight": torch.ones(16)})


def test_merge_accepts_refs_checks_base_and_records_lineage(run_cli, make_adapter, reg, tmp_path, registry_home):
    base = _base(tmp_path / "base", 0)
    other = _base(tmp_path / "other", 1)
    r = run_cli("push", make_adapter("a", modules=1), "--name", "team/x", "--base-model", "tiny", "--base", base,
                "--tag", "prod")
    assert r.code == 0, r.err
    refused = run_cli("merge", "team/x@prod", "--base", other, "--to", "safetensors", "-o", tmp_path / "bad",
                      "--home", registry_home)
    assert refused.code != 0 and "another base" in refused.err and len(refused.err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    ok = run_cli("merge", "team/x@prod", "--base", base, "--to", "safetensors", "-o", tmp_path / "merged",
                 "--home", registry_home, "--json")
    assert ok.code == 0, ok.err
    arts = [n for n in reg.lineage("team/x:1")["nodes"] if n["type"] == "artifact"]
    assert len(arts) == 1 and Path(arts[0]["path"]) == (tmp_path / "merged").resolve()
    art = reg.show(arts[0]["id"])
    assert art.inputs == [("team/x:1", 1.0)] and art.kind == "safetensors"
    assert reg.verify().ok
    forced = run_cli("merge", "team/x:1", "--base", other, "--to", "safetensors", "-o", tmp_path / "forced",
                     "--home", registry_home, "--allow-base-mismatch")
    assert forced.code == 0, forced.err
