"""mora_core's readers against hostile files: the strict JSON reader, regular files only,
bounded safetensors headers, adapter value rules, PEFT patterns in bounded time.

The CLI-level campaign is tests/cli/test_hostile_inputs.py; these pin the library contract
(one `MoraCoreError` line naming the file) and the semantics that must survive the bounds.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from mora_core.adapter import load_adapter
from mora_core.errors import AdapterError, MoraCoreError
from mora_core.patterns import Matcher
from mora_core.safe_io import MAX_DEPTH, open_regular, parse_json, read_json
from mora_core.safetensors_io import MAX_TENSORS, SafetensorsFile
from mora_core.spec import parse_config
from tests.builders import deep_json, write_lora_folder, write_raw_safetensors

MODULE = "model.layers.0.self_attn.q_proj"


# ----------------------------------------------------------------------------- the JSON reader

@pytest.mark.parametrize("doc, why", [
    (deep_json(200_000), "nested deeper"),
    (deep_json(MAX_DEPTH + 1), "nested deeper"),
    ('{"r": 4, "r": 8}', "appears twice"),
    ('{"a": {"b": 1, "b": 2}}', "appears twice"),
    ('{"a": NaN}', "NaN"),
    ('{"a": -Infinity}', "Infinity"),
    ('{"a": ' + "9" * 5000 + "}", "number of 5000"),
    ('{"a": 1', "line 1"),
    (b'{"\xff": 1}', "UTF-8"),
])
def test_parse_json_refuses(doc, why):
    with pytest.raises(MoraCoreError, match=why) as info:
        parse_json(doc, "cfg.json")
    assert str(info.value).startswith("cfg.json: ") and "\n" not in str(info.value)


def test_parse_json_accepts_ordinary_json():
    doc = {"a": [1, 2.5, {"b": None, "c": "[[[{{{ \\" + '"'}], "d": deep_json(3), "e": -0.0}
    assert parse_json(json.dumps(doc), "x") == doc
    assert parse_json(deep_json(MAX_DEPTH), "x") is not None
    assert parse_json('{"s": "' + "[" * 1000 + '"}', "x") == {"s": "[" * 1000}  # brackets in strings


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            read_json(fifo, AdapterError)
        except AdapterError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert "not a regular file (a FIFO)" in result["error"]


def test_open_regular_refuses_folders(tmp_path):
    with pytest.raises(MoraCoreError, match="a folder"):
        open_regular(tmp_path)


def test_size_cap(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{}" + " " * 2000)
    with pytest.raises(MoraCoreError, match="larger than 1000 bytes"):
        read_json(p, max_bytes=1000)


# ----------------------------------------------------------------------------- safetensors headers

def entry(shape, begin=0, dtype="F32"):
    n = 4
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n]}


@pytest.mark.parametrize("header, why", [
    ("{" + f'"a": {json.dumps(entry([0]))}, "a": {json.dumps(entry([0]))}' + "}", "appears twice"),
    ({"a": entry([0, 2**70])}, "impossible shape"),
    ({"a": entry([1] * 9)}, "impossible shape"),
    ({"a": {**entry([2]), "shape": [2.0]}}, "lists of integers"),
    ({"a": {**entry([2]), "shape": [True, 1]}}, "lists of integers"),
    ({"a": {**entry([2]), "extra": 1}}, "malformed"),
    ({"a": entry([2]), "__metadata__": {"k": 1}}, "__metadata__"),
    ({"a": entry([2], dtype="F128")}, "unsupported dtype"),
    (deep_json(100), "nested deeper"),
])
def test_header_refused(tmp_path, header, why):
    p = write_raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 64)
    with pytest.raises(AdapterError, match=why):
        SafetensorsFile(p)


def test_header_entry_bound_is_checked_before_parsing(tmp_path):
    n = MAX_TENSORS + 1
    text = "{" + ",".join(f'"e{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}"
    p = write_raw_safetensors(tmp_path / "x.safetensors", text)
    started = time.perf_counter()
    with pytest.raises(AdapterError, match=f"more than {MAX_TENSORS} tensors"):
        SafetensorsFile(p)
    assert time.perf_counter() - started < 5  # refused from a byte count, not after decoding


def test_zero_size_tensors_next_to_data_are_fine(tmp_path):
    header = {"z": entry([0], 16), "a": entry([4], 0), "b": entry([4], 16)}
    f = SafetensorsFile(write_raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 32))
    assert sorted(f.tensors) == ["a", "b", "z"] and f.read("z").shape == (0,)


# ----------------------------------------------------------------------------- adapter values

@pytest.mark.parametrize("dtype, code", [(torch.int32, "I32"), (torch.int64, "I64"), (torch.bool, "BOOL"),
                                         (torch.uint8, "U8"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_non_float_adapter_weights_refused(tmp_path, dtype, code):
    folder = write_lora_folder(tmp_path / "a", {MODULE: (8, 8)}, dtype=dtype)
    with pytest.raises(AdapterError, match=f"is {code}; adapter weights must be"):
        load_adapter(folder)


@pytest.mark.parametrize("cfg, why", [
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": True}, "lora_alpha must be a finite number, got True"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
    ({"use_mora": "false"}, "use_mora must be true or false"),
    ({"use_dora": 1}, "use_dora must be true or false"),
    ({"r": 2**40}, "r must be an integer from 1"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern key '\\(' is not a valid regular expression"),
    ({"target_modules": [1, 2]}, "target_modules must be a list"),
])
def test_config_values_refused(tmp_path, cfg, why):
    with pytest.raises(AdapterError, match=why):
        parse_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **cfg}, tmp_path / "adapter_config.json")


@pytest.mark.parametrize("targets", [["k_proj"], r".*\.k_proj", ["self_attn"], ["layers.0.self_attn.q"]])
def test_target_modules_must_select_every_module(tmp_path, targets):
    folder = write_lora_folder(tmp_path / "a", {MODULE: (8, 8)}, config={"target_modules": targets})
    with pytest.raises(AdapterError, match="is not selected by target_modules"):
        load_adapter(folder)


@pytest.mark.parametrize("targets", [["q_proj"], [MODULE], ["self_attn.q_proj"], r".*\.q_proj",
                                     r"model\.layers\.\d+\.self_attn\.(q|v)_proj", "all-linear", None, []])
def test_target_modules_peft_semantics_kept(tmp_path, targets):
    folder = write_lora_folder(tmp_path / "a", {MODULE: (8, 8)}, config={"target_modules": targets})
    assert list(load_adapter(folder).layers) == [MODULE]


# ----------------------------------------------------------------------------- patterns

@pytest.mark.parametrize("key, module, hit", [
    ("q_proj", MODULE, True),
    ("self_attn.q_proj", MODULE, True),
    ("elf_attn.q_proj", MODULE, False),  # a tail after a dot, not any suffix
    (r"layers\.0\..*", MODULE, True),
    (r"layers\.[1-9]\..*", MODULE, False),
    (r"model.layers.(0|1).self_attn.q_proj", MODULE, True),
    ("^model.layers.0.self_attn.q_proj", MODULE, True),
])
def test_patterns_keep_peft_semantics(key, module, hit):
    import re

    assert Matcher().matches(key, module) is hit
    assert (re.match(rf"(.*\.)?({key})$", module) is not None) is hit  # PEFT's own expression


def test_exponential_pattern_is_stopped_by_the_budget(tmp_path):
    mods = {"a" * 30 + f".m{i}": (8, 8) for i in range(3)}
    folder = write_lora_folder(tmp_path / "a", mods, config={"rank_pattern": {"(a|a)+b": 8},
                                                             "target_modules": ["m0", "m1", "m2"]})
    started = time.process_time()
    with pytest.raises(AdapterError, match=r"rank_pattern key '\(a\|a\)\+b' takes more than"):
        load_adapter(folder)
    assert time.process_time() - started < 10  # the budget: 1 s of matching (CPU), shared; before: 47 s


def test_rank_pattern_exact_and_regex_ranks(tmp_path):
    mods = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(3)}
    folder = tmp_path / "a"
    write_lora_folder(folder, {m: s for m, s in list(mods.items())[:2]}, r=4)
    write_lora_folder(tmp_path / "b", {"model.layers.2.self_attn.q_proj": (8, 8)}, r=2)
    from safetensors.torch import load_file, save_file

    t = {**load_file(str(folder / "adapter_model.safetensors")), **load_file(str(tmp_path / "b" / "adapter_model.safetensors"))}
    save_file(t, str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {r"layers\.2\..*": 2}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    a = load_adapter(folder)
    assert {m: a.spec.rank_for(m) for m in a.layers} == {m: (2 if ".2." in m else 4) for m in mods}


def test_read_into_fills_a_reused_buffer_and_refuses_a_short_file(tmp_path):
    from safetensors.torch import save_file

    a = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    b = torch.randn(5, 7)
    save_file({"a": a, "b": b}, str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(tmp_path / "t.safetensors")
    buf = bytearray(b"\xff" * 200)  # one buffer for both, larger than either
    f.read_into("b", memoryview(buf)[: b.numel() * 4])
    assert bytes(buf[: b.numel() * 4]) == b.numpy().tobytes()
    f.read_into("a", memoryview(buf)[:24])
    assert bytes(buf[:24]) == a.view(torch.int16).numpy().tobytes()
    with pytest.raises(ValueError, match="a buffer of 23 bytes for 24"):
        f.read_into("a", memoryview(buf)[:23])
    with open(tmp_path / "t.safetensors", "r+b") as fh:  # the file shrinks after its header was read
        fh.truncate(os.path.getsize(tmp_path / "t.safetensors") - 8)
    last = max(f.tensors.values(), key=lambda t: t.end)
    with pytest.raises(MoraCoreError, match="truncated"):
        f.read_into(last.name, memoryview(buf)[: last.nbytes])
