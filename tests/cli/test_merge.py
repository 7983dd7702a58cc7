"""`adapters merge --to safetensors` through the real console script."""

from __future__ import annotations

import json

import pytest
import torch

from tests.builders import (
    llama_like,
    mora_shapes,
    read_folder,
    write_lora_folder,
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


def test_summary_says_what_changed_by_how_much_and_the_dtype_used(tmp_path):
    """tensors changed (a zero LoRA branch changes nothing), max |dW| (computed here from the
    adapter's factors in float64; the tensor spans several measuring chunks) and the dtype
    `auto` resolved to, in --json and in the human lines."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(1)
    n = 700  # 490,000 elements: the largest |dW| may lie in any of the merge's measuring chunks
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(n, n, generator=g) * 0.1,
            "model.layers.0.self_attn.v_proj.weight": torch.randn(n, n, generator=g) * 0.1,
            "model.norm.weight": torch.ones(n)}
    shapes = {"model.layers.0.self_attn.q_proj": (n, n), "model.layers.0.self_attn.v_proj": (n, n)}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        write_tensor_base(tmp_path / f"base-{name}", {k: v.to(dtype) for k, v in base.items()})
    lora = write_lora_folder(tmp_path / "lora", shapes, r=4)
    weights = load_file(lora / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].zero_()
    save_file(weights, str(lora / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    expected = (0.5 * 2.0 * b @ a).abs().max().item()  # weight 0.5, alpha/r = 2

    p = adapters("merge", lora, "--weight", "0.5", "--base", tmp_path / "base-float32", "--to", "safetensors",
                 "-o", tmp_path / "out32", "--no-register", "--json", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["tensors_merged"], s["tensors_changed"], s["tensors_total"]) == (2, 1, 3)
    assert s["max_abs_delta"] == pytest.approx(expected, rel=1e-5)
    assert s["max_abs_delta_tensor"] == "model.layers.0.self_attn.q_proj.weight"
    out = read_folder(tmp_path / "out32")
    measured = (out["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"])
    assert s["max_abs_delta"] == measured.abs().max().item()  # float32 output: exactly the dW applied
    assert (s["dtype"], s["dtype_requested"]) == ("float32", "auto")

    p = adapters("merge", lora, "--weight", "0.5", "--base", tmp_path / "base-bfloat16", "--to", "safetensors",
                 "-o", tmp_path / "out16", "--no-register", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(None, 1) if not line.startswith("max") else ("max |dW|", line[len("max |dW|"):].strip())
                 for line in p.stdout.splitlines())
    assert lines["tensors"] == "1 changed of 3 (2 merged, 1 shard(s))"
    assert lines["dtype"] == "bfloat16 (auto: kept from the base)"
    assert lines["max |dW|"].startswith(f"{expected:.3g}"[:4])
    p = adapters("merge", lora, "--base", tmp_path / "base-bfloat16", "--to", "safetensors", "--dtype", "float32",
                 "-o", tmp_path / "out16-32", "--no-register", "--json", home=tmp_path / "home")
    assert (json.loads(p.stdout)["dtype"], json.loads(p.stdout)["dtype_requested"]) == ("float32", "float32")
