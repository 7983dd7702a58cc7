"""mora_core.checkpoint: a base opened once, the folder rule, the one weight-suffix table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mora_core.checkpoint import (
    PICKLE_SUFFIXES,
    is_weight_or_index,
    member,
    open_checkpoint,
    weight_kind,
)
from mora_core.errors import MergeError
from tests.builders import write_tensor_base


def _tensors() -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.randn(10, 4), "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
            "model.norm.weight": torch.ones(4)}


def test_sharded_checkpoint_facts(tmp_path):
    write_tensor_base(tmp_path / "b", _tensors(), shards=2,
               config={"model_type": "llama", "tie_word_embeddings": True})
    ck = open_checkpoint(tmp_path / "b")
    assert [p.name for p in ck.paths] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ck.shapes == {k: tuple(v.shape) for k, v in _tensors().items()}
    assert ck.config["model_type"] == "llama"
    assert ck.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert ck.weight_file_names() == {p.name for p in ck.paths} | {"model.safetensors.index.json"}
    assert ck.nbytes == sum(v.numel() * 4 for v in _tensors().values())


def test_untied_config_or_present_head_means_no_tied_pair(tmp_path):
    write_tensor_base(tmp_path / "b", _tensors(), config={"tie_word_embeddings": False})
    assert open_checkpoint(tmp_path / "b").tied == {}
    t = _tensors() | {"lm_head.weight": torch.randn(10, 4)}
    write_tensor_base(tmp_path / "c", t, config={"tie_word_embeddings": True})
    assert open_checkpoint(tmp_path / "c").tied == {}


def test_shard_symlink_leaving_the_folder_is_refused(tmp_path):
    write_tensor_base(tmp_path / "b", _tensors(), shards=2)
    shard = tmp_path / "b" / "model-00001-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(MergeError, match="symbolic link leaving the folder"):
        open_checkpoint(tmp_path / "b")


def test_symlink_inside_the_folder_is_read(tmp_path):
    write_tensor_base(tmp_path / "b", _tensors())
    (tmp_path / "b" / "model.safetensors").rename(tmp_path / "b" / "weights.data")
    (tmp_path / "b" / "model.safetensors").symlink_to("weights.data")
    assert set(open_checkpoint(tmp_path / "b").shapes) == set(_tensors())


def test_config_symlink_leaving_the_folder_is_refused(tmp_path):
    write_tensor_base(tmp_path / "b", _tensors())
    (tmp_path / "secret.json").write_text(json.dumps({"x": 1}))
    (tmp_path / "b" / "config.json").unlink()
    (tmp_path / "b" / "config.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(MergeError, match="config.json: a symbolic link leaving the folder"):
        open_checkpoint(tmp_path / "b")


def test_non_regular_member_is_refused(tmp_path):
    (tmp_path / "b").mkdir()
    os.mkfifo(tmp_path / "b" / "pipe")
    (tmp_path / "b" / "dir").mkdir()
    for name in ("pipe", "dir"):
        with pytest.raises(MergeError, match="not a regular file"):
            member(tmp_path / "b", name)
    with pytest.raises(MergeError, match="not a plain file name"):
        member(tmp_path / "b", "../b/pipe")
    with pytest.raises(MergeError, match="not found"):
        member(tmp_path / "b", "absent")


def test_index_pointing_at_a_path_is_refused(tmp_path):
    write_tensor_base(tmp_path / "b", _tensors(), shards=2)
    index = tmp_path / "b" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "../x.safetensors" for k in data["weight_map"]}
    index.write_text(json.dumps(data))
    with pytest.raises(MergeError, match="not a plain file name"):
        open_checkpoint(tmp_path / "b")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(MergeError, match="pytorch_model.bin: pickle checkpoints are refused"):
        open_checkpoint(tmp_path / "b")


def test_one_suffix_table():
    assert weight_kind("model-00001-of-00002.safetensors") == "safetensors"
    assert weight_kind("pytorch_model.BIN") == "pickle" and ".ckpt" in PICKLE_SUFFIXES
    assert weight_kind("model.onnx.data") == "onnx" and weight_kind("tokenizer.json") is None
    assert is_weight_or_index("pytorch_model.bin.index.json") and not is_weight_or_index("config.json")
