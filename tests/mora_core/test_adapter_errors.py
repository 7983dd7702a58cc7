"""Every bad adapter folder is refused with one line naming the file and the problem."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from mora_core.adapter import load_adapter
from mora_core.errors import AdapterError
from tests.builders import write_mora_adapter

MODULE = "model.layers.0.self_attn.q_proj"


def lora_folder(path, a_shape=(4, 32), b_shape=(32, 4), config=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    t = tensors if tensors is not None else {
        f"base_model.model.{MODULE}.lora_A.weight": torch.randn(*a_shape),
        f"base_model.model.{MODULE}.lora_B.weight": torch.randn(*b_shape),
    }
    save_file(t, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def expect_error(path, pattern):
    with pytest.raises(AdapterError) as info:
        load_adapter(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(pattern, msg), msg
    return msg


def test_good_lora_loads(tmp_path):
    a = load_adapter(lora_folder(tmp_path / "a"))
    assert a.kind == "lora" and list(a.layers) == [MODULE]
    assert a.summary()["modules"][MODULE]["scaling"] == 2.0


def test_mora_is_recognised_even_though_peft_would_read_lora(tmp_path):
    write_mora_adapter(tmp_path / "m", {MODULE: (64, 64)}, r=8, mora_type=6)
    a = load_adapter(tmp_path / "m")
    s = a.summary()
    assert a.kind == "mora" and s["mora_type"] == 6 and s["modules"][MODULE]["r_hat"] == 32


def test_missing_config(tmp_path):
    p = lora_folder(tmp_path / "a")
    (p / "adapter_config.json").unlink()
    expect_error(p, r"adapter_config.json: not found")


def test_malformed_config(tmp_path):
    p = lora_folder(tmp_path / "a")
    (p / "adapter_config.json").write_text("{not json")
    expect_error(p, r"adapter_config.json: is not valid JSON")


@pytest.mark.parametrize("peft_type", ["IA3", "PROMPT_TUNING", "LOHA"])
def test_unsupported_adapter_types_are_named(tmp_path, peft_type):
    p = lora_folder(tmp_path / "a", config={"peft_type": peft_type})
    expect_error(p, rf"peft_type {peft_type} is not supported")


def test_truncated_safetensors(tmp_path):
    p = lora_folder(tmp_path / "a")
    f = p / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    expect_error(p, r"adapter_model.safetensors: .*truncated")


def test_corrupted_header(tmp_path):
    p = lora_folder(tmp_path / "a")
    f = p / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[10:20] = b"\xff" * 10
    f.write_bytes(bytes(raw))
    expect_error(p, r"adapter_model.safetensors: header is not valid JSON")


def test_header_claiming_gigabytes(tmp_path):
    p = lora_folder(tmp_path / "a")
    f = p / "adapter_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 8 << 30) + raw[8:])
    expect_error(p, r"header claims 8589934592 bytes")


def test_tensor_claiming_more_data_than_the_file_has(tmp_path):
    p = tmp_path / "a"
    p.mkdir()
    header = json.dumps({f"base_model.model.{MODULE}.lora_A.weight":
                         {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40000000000]}}).encode()
    (p / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    expect_error(p, r"truncated")


def test_lora_rank_mismatch(tmp_path):
    p = lora_folder(tmp_path / "a", a_shape=(4, 32), b_shape=(32, 3))
    expect_error(p, rf"module {MODULE}: lora_A \[4, 32\] and lora_B \[32, 3\] do not share a rank")


def test_mora_copies_that_differ(tmp_path):
    write_mora_adapter(tmp_path / "m", {MODULE: (64, 64)})
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    t[f"base_model.model.{MODULE}.lora_B.weight"][0, 0] += 1e-3
    save_file(t, str(tmp_path / "m" / "adapter_model.safetensors"))
    expect_error(tmp_path / "m", r"MoRA's two copies .* differ")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    a = torch.randn(4, 32)
    a[1, 2] = bad
    p = lora_folder(tmp_path / "a", tensors={f"base_model.model.{MODULE}.lora_A.weight": a,
                                            f"base_model.model.{MODULE}.lora_B.weight": torch.randn(32, 4)})
    expect_error(p, r"lora_A.weight holds NaN or Inf")


def test_pickle_checkpoint_is_refused(tmp_path):
    p = tmp_path / "a"
    p.mkdir()
    (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (p / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    expect_error(p, r"adapter_model.bin: pickle checkpoints are refused")


def test_rank_differs_from_config(tmp_path):
    p = lora_folder(tmp_path / "a", config={"r": 8})
    expect_error(p, r"has rank 4 but the config .* says 8")


def test_missing_half_of_a_pair(tmp_path):
    p = lora_folder(tmp_path / "a", tensors={f"base_model.model.{MODULE}.lora_A.weight": torch.randn(4, 32)})
    expect_error(p, rf"module {MODULE} has no lora_B.weight")


def test_not_a_folder(tmp_path):
    expect_error(tmp_path / "nope", r"not an adapter folder")
