"""`adapters merge --to safetensors` through the real console script."""

from __future__ import annotations

import json

import torch

from tests.builders import (
    llama_like,
    mora_shapes,
    read_folder,
    write_mora_adapter,
    write_tensor_base,
)
from tests.cli_runner import run_adapters


def adapters(*args, home):
    return run_adapters(args, home=home)


def test_merge_json_summary(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like(), shards=2)
    write_mora_adapter(tmp_path / "m1", mora_shapes(), mora_type=1)
    write_mora_adapter(tmp_path / "m6", mora_shapes(), mora_type=6, r=4)
    p = adapters("merge", tmp_path / "m1", tmp_path / "m6", "--weight", "1", "--weight", "0.5", "--base",
                 tmp_path / "base", "--to", "safetensors", "-o", tmp_path / "out", "--no-register", "--json",
                 home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["tensors_merged"] == 6 and s["shards"] == 2
    assert s["keys_used"] == {"m1": 6, "m6": 6}
    assert [a["weight"] for a in s["adapters"]] == [1.0, 0.5]
    assert s["peak_rss_mb"] > 0 and s["seconds"] >= 0
    assert len(read_folder(tmp_path / "out")) == len(llama_like())


def test_human_output_is_short(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like(dtype=torch.bfloat16))
    write_mora_adapter(tmp_path / "m", mora_shapes())
    p = adapters("merge", tmp_path / "m", "--base", tmp_path / "base", "--to", "safetensors", "-o",
                 tmp_path / "out", "--no-register", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    assert "tensors" in p.stdout and "6 merged" in p.stdout
    assert p.stderr == ""  # no progress bar when not on a TTY


def test_bad_adapter_is_one_line_and_nothing_written(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    p = adapters("merge", tmp_path / "bad", "--base", tmp_path / "base", "--to", "safetensors", "-o",
                 tmp_path / "out", "--no-register", home=tmp_path / "home")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "adapter_config.json" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_weight_count_mismatch(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like())
    write_mora_adapter(tmp_path / "m", mora_shapes())
    p = adapters("merge", tmp_path / "m", "--weight", "1", "--weight", "2", "--base", tmp_path / "base",
                 "--to", "safetensors", "-o", tmp_path / "out", "--no-register", home=tmp_path / "home")
    assert p.returncode == 2 and "1 adapters but 2 --weight values" in p.stderr


def test_missing_base(tmp_path):
    write_mora_adapter(tmp_path / "m", mora_shapes())
    p = adapters("merge", tmp_path / "m", "--base", tmp_path / "nope", "--to", "safetensors", "-o",
                 tmp_path / "out", "--no-register", home=tmp_path / "home")
    assert p.returncode == 2 and "base model not found" in p.stderr and "Traceback" not in p.stderr
