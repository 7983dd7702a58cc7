"""exporters.outputs and exporters.safetensors_out: atomic folders, one side-file rule,
digests taken while writing (checked against an independent sha256 of the files)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from exporters.errors import ExportError
from exporters.outputs import (
    SIDE_FILE_MAX_BYTES,
    copy_side_files,
    refuse_existing,
    side_files,
    staged_output,
)
from exporters.safetensors_out import SafetensorsFolderWriter, merge_folder
from mora_core.adapter import load_adapter
from mora_core.checkpoint import open_checkpoint
from mora_core.errors import MergeError
from mora_core.merge import plan_merge, stream_merge
from mora_core.safetensors_io import PlannedTensor
from tests.builders import read_folder, write_mora_adapter, write_tensor_base


def sha(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_staged_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), staged_output(out) as tmp:
        (tmp / "a").write_text("x")
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_output(out) as tmp:
        (tmp / "a").write_text("x")
        assert not out.exists()
    assert (out / "a").read_text() == "x" and list(tmp_path.iterdir()) == [out]


def test_existing_output_is_refused_and_kept(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for p in (tmp_path / "full", tmp_path / "file"):
        with pytest.raises(ExportError, match="already exists"):
            refuse_existing(p)
        with pytest.raises(ExportError, match="already exists"), staged_output(p):
            pass
    assert (tmp_path / "full" / "keep").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty folder is an existing path too (one rule, every output)
    with pytest.raises(ExportError, match="already exists"), staged_output(tmp_path / "empty"):
        pass
    assert list((tmp_path / "empty").iterdir()) == []
    with staged_output(tmp_path / "new") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "new" / "x").is_file()


def test_output_created_meanwhile_is_not_replaced(tmp_path):
    with pytest.raises(ExportError, match="already exists"), staged_output(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
        (tmp_path / "out").mkdir()  # someone else's folder appears during the work
    assert list((tmp_path / "out").iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_one_side_file_rule(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        (base / name).write_text("{}")
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "x.ckpt",
                 "model.onnx", "model.onnx.data", ".hidden"):
        (base / name).write_text("w")
    (tmp_path / "secret.txt").write_text("s")
    (base / "inside.txt").symlink_to("tokenizer.json")
    (base / "sub").mkdir()
    with open(base / "huge.txt", "wb") as fh:
        fh.truncate(SIDE_FILE_MAX_BYTES + 1)
    assert side_files(base) == ["config.json", "generation_config.json", "inside.txt", "tokenizer.json"]
    # a link leaving the folder, or a FIFO, is an error naming it (not a silently thinner output)
    (base / "tokenizer_config.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(MergeError, match="tokenizer_config.json: a symbolic link leaving the folder"):
        side_files(base)
    (base / "tokenizer_config.json").unlink()
    os.mkfifo(base / "special_tokens_map.json")
    with pytest.raises(MergeError, match="special_tokens_map.json: not a regular file"):
        side_files(base)


def test_hugging_face_cache_snapshot_links_are_followed(tmp_path):
    """A snapshot's files are links to ../../blobs/<hash>: inside the repository, so allowed."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "h1").write_text("{}")
    (snap / "config.json").symlink_to("../../blobs/h1")
    (tmp_path / "elsewhere.json").write_text("{}")
    assert side_files(snap) == ["config.json"]
    (snap / "tokenizer.json").symlink_to("../../../elsewhere.json")
    with pytest.raises(MergeError, match="leaving the folder"):
        side_files(snap)


def test_side_files_are_hashed_as_written_and_config_edited(tmp_path):
    base, dest = tmp_path / "base", tmp_path / "dest"
    base.mkdir()
    dest.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    (base / "tokenizer_config.json").write_text("{}")
    digests = copy_side_files(base, dest, {"torch_dtype": "bfloat16", "dtype": "bfloat16", "absent": 1})
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg == {"model_type": "llama", "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    assert digests == {n: sha(dest / n) for n in ("config.json", "tokenizer_config.json")}


def _modules_base(tmp_path, modules):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "README.md").write_text("# the base's own card")
    (base / "modules.json").write_text(json.dumps(modules))
    return base


ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
              {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
              {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
              {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]


def test_module_folders_travel_and_the_base_card_does_not(tmp_path):
    base = _modules_base(tmp_path, ST_MODULES)
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (base / "2_Dense").mkdir()
    (base / "2_Dense" / "config.json").write_text("{}")
    (base / "2_Dense" / "model.safetensors").write_bytes(b"dense weights")  # the module's own: kept
    (base / "2_Dense" / "pytorch_model.bin").write_bytes(b"pickle")  # never copied
    (base / "2_Dense" / "README.md").write_text("card")
    (base / "onnx").mkdir()  # not referred to: the base's own ONNX export stays behind
    (base / "onnx" / "model.onnx").write_text("x")
    dest = tmp_path / "dest"
    dest.mkdir()
    digests = copy_side_files(base, dest)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors", "config.json",
                     "modules.json"]  # 3_Normalize has no folder: nothing to copy; no README.md
    assert digests == {rel: sha(dest / rel) for rel in files}
    assert (dest / "2_Dense" / "model.safetensors").read_bytes() == b"dense weights"


@pytest.mark.parametrize("path, message", [
    ("../outside", "is not a folder inside"),
    ("/etc", "is not a folder inside"),
    ("link", "is not a folder inside"),
    (7, "a module without a path"),
])
def test_module_paths_leaving_the_base_are_refused(tmp_path, path, message):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text("{}")
    base = _modules_base(tmp_path, [{"idx": 1, "path": path}])
    if path == "link":  # a sub-folder link leaving the base (a top-level one is refused by side_files too)
        (base / "sub").mkdir()
        (base / "sub" / "link").symlink_to(tmp_path / "outside")
        (base / "modules.json").write_text(json.dumps([{"idx": 1, "path": "sub/link"}]))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(MergeError, match=message):
        copy_side_files(base, dest)
    assert list(dest.iterdir()) == []  # refused before the first byte


def test_module_files_follow_the_side_file_rule(tmp_path):
    base = _modules_base(tmp_path, ST_MODULES[:2])
    (base / "1_Pooling").mkdir()
    (tmp_path / "secret").write_text("s")
    (base / "1_Pooling" / "config.json").symlink_to(tmp_path / "secret")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(MergeError, match="1_Pooling/config.json: a symbolic link leaving the folder"):
        copy_side_files(base, dest)
    (base / "1_Pooling" / "config.json").unlink()
    os.mkfifo(base / "1_Pooling" / "config.json")
    with pytest.raises(MergeError, match="not a regular file"):
        copy_side_files(base, dest)
    (base / "1_Pooling" / "config.json").unlink()
    (base / "1_Pooling" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MergeError, match="only as a pickle"):
        copy_side_files(base, dest)
    assert list(dest.iterdir()) == []


def _base_and_adapter(tmp_path, shards=2):
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16)}
    for i in range(3):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    write_tensor_base(tmp_path / "base", tensors, shards=shards)
    write_mora_adapter(tmp_path / "a", {f"model.layers.{i}.self_attn.q_proj": (16, 16) for i in range(3)}, r=4)
    return tensors


@pytest.mark.parametrize("shards,dtype", [(1, "auto"), (3, "auto"), (2, "float16")])
def test_merge_folder_reports_the_digest_of_every_output_file(tmp_path, shards, dtype):
    """float16: every tensor is cast, so merged tensors follow each other through the loop's
    buffers while the writer still hashes the previous one."""
    _base_and_adapter(tmp_path, shards)
    report = merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out", dtype=dtype)
    out = tmp_path / "out"
    on_disk = sorted(p.name for p in out.iterdir())
    assert sorted(report.digests) == on_disk
    assert report.digests == {name: sha(out / name) for name in on_disk}  # raw copies and merged tensors alike
    assert ("model.safetensors.index.json" in on_disk) == (shards > 1)


def test_folder_writer_is_format_only(tmp_path):
    """The loop sees a TensorWriter; the same stream into another writer gives the same tensors."""
    tensors = _base_and_adapter(tmp_path)
    ck = open_checkpoint(tmp_path / "base")
    plan = plan_merge(ck, [load_adapter(tmp_path / "a")], [1.0])

    class Collect:
        def __init__(self):
            self.got, self.layout = {}, None

        def start(self, shards):
            self.layout = [[t.name for t in s] for s in shards]

        def write(self, planned, tensor):
            self.got[planned.name] = tensor.clone()

        def copy(self, planned, source, name):
            self.got[planned.name] = source.read(name)

    c = Collect()
    stats = stream_merge(ck, plan, c, max_shard_bytes=600)
    assert stats.shards == len(c.layout) > 2 and set(c.got) == set(tensors)
    (tmp_path / "o").mkdir()
    with SafetensorsFolderWriter(tmp_path / "o") as w:
        stream_merge(ck, plan, w, max_shard_bytes=600)
        files = w.finish()
    assert files == {p.name: sha(p) for p in (tmp_path / "o").iterdir()}
    got = read_folder(tmp_path / "o")
    for name, t in c.got.items():
        torch.testing.assert_close(got[name], t, atol=0, rtol=0)


def test_writer_refuses_a_stream_that_stops_early(tmp_path):
    (tmp_path / "o").mkdir()
    with SafetensorsFolderWriter(tmp_path / "o") as w:
        layout = [[PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "F32", (2,))]]
        w.start(layout)
        w.write(layout[0][0], torch.zeros(2))
        with pytest.raises(RuntimeError, match="stopped before the last shard"):
            w.finish()
