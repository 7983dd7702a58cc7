"""The streaming folder merge: shards, several weighted adapters, dtypes, atomic output."""

from __future__ import annotations

import json

import pytest
import torch

from exporters.errors import ExportError
from exporters.safetensors_out import merge_folder
from mora_core.adapter import load_adapter
from mora_core.errors import MergeError
from mora_core.mora import MoraOperator, mora_rank
from tests.builders import (
    H,
    I,
    llama_like,
    mora_matrices,
    mora_shapes,
    read_folder,
    write_mora_adapter,
    write_tensor_base,
)


def expected_delta(ms: dict[str, torch.Tensor], r: int, t: int, name: str) -> torch.Tensor | None:
    module = name.removesuffix(".weight")
    if module not in ms:
        return None
    in_f, out_f = mora_shapes()[module]
    return MoraOperator(in_f, out_f, mora_rank(in_f, out_f, r, t), t).delta(ms[module].double())


def test_sharded_merge_of_two_weighted_adapters_is_exact(tmp_path):
    base = llama_like()
    write_tensor_base(tmp_path / "base", base, shards=3)
    ms1 = mora_matrices(write_mora_adapter(tmp_path / "a1", mora_shapes(), r=8, mora_type=1, seed=1))
    ms6 = mora_matrices(write_mora_adapter(tmp_path / "a6", mora_shapes(), r=4, mora_type=6, seed=2))
    adapters = [load_adapter(tmp_path / "a1"), load_adapter(tmp_path / "a6")]
    report = merge_folder(tmp_path / "base", adapters, tmp_path / "out", weights=[0.5, -1.25])
    assert report.shards == 3 and report.tensors_merged == 6
    assert report.keys_used == {"a1": 6, "a6": 6}
    got = read_folder(tmp_path / "out")
    assert set(got) == set(base)
    for name, w in base.items():
        expect = w.double()
        for ms, r, t, weight in ((ms1, 8, 1, 0.5), (ms6, 4, 6, -1.25)):
            d = expected_delta(ms, r, t, name)
            if d is not None:
                expect = expect + weight * d
        torch.testing.assert_close(got[name].double(), expect, atol=1e-6, rtol=0, msg=name)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_unchanged_tensors_are_byte_identical(tmp_path):
    base = llama_like()
    write_tensor_base(tmp_path / "base", base)
    write_mora_adapter(tmp_path / "a", mora_shapes(), mora_type=1)
    merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out")
    got = read_folder(tmp_path / "out")
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_accumulates_in_float32_and_casts_once(tmp_path, dtype):
    base = llama_like(dtype=dtype)
    write_tensor_base(tmp_path / "base", base)
    ms = mora_matrices(write_mora_adapter(tmp_path / "a", mora_shapes(), mora_type=1, scale=0.01))
    merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")] * 2, tmp_path / "out", weights=[0.3, 0.3])
    got = read_folder(tmp_path / "out")
    name = "model.layers.1.mlp.down_proj.weight"
    delta = expected_delta(ms, 8, 1, name)
    exact = base[name].double() + 0.6 * delta
    half_path = (base[name] + (0.3 * delta).to(dtype)) + (0.3 * delta).to(dtype)
    assert got[name].dtype == dtype
    # one rounding at the end: within one ulp of the exact value everywhere...
    torch.testing.assert_close(got[name].double(), exact, atol=torch.finfo(dtype).tiny, rtol=torch.finfo(dtype).eps)
    # ...and measurably closer than rounding after every step
    err_once = (got[name].double() - exact).abs().sum()
    err_half = (half_path.double() - exact).abs().sum()
    assert err_once < 0.75 * err_half


def test_output_dtype_conversion_and_config(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like(), config={"model_type": "llama", "torch_dtype": "float32"})
    write_mora_adapter(tmp_path / "a", mora_shapes(), mora_type=6)
    merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out", dtype="bfloat16",
                 max_shard_bytes=60_000)
    got = read_folder(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


def test_prefix_differences_are_resolved(tmp_path):
    """GPT-2 hub checkpoints omit `transformer.`; PEFT keys include it."""
    g = torch.Generator().manual_seed(0)
    write_tensor_base(tmp_path / "base", {"h.0.attn.c_attn.weight": torch.randn(H, 3 * H, generator=g)})
    write_mora_adapter(tmp_path / "a", {"transformer.h.0.attn.c_attn": (H, 3 * H)}, fan_in_fan_out=True)
    report = merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out")
    assert report.tensors_merged == 1


def test_unmatched_module_is_an_error_before_any_write(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like())
    write_mora_adapter(tmp_path / "a", {"model.layers.9.self_attn.q_proj": (H, H)})
    with pytest.raises(MergeError, match=r"model.layers.9.self_attn.q_proj matches no tensor"):
        merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


def test_shape_that_does_not_fit_is_an_error(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like())
    # r_hat for a 48->80 layer, placed on a 48->48 one
    write_mora_adapter(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (H, I)}, r=8)
    with pytest.raises(MergeError, match="needs r_hat"):
        merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_result_names_the_tensor(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like(dtype=torch.float16))
    write_mora_adapter(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (H, H)}, scale=1.0)
    with pytest.raises(MergeError, match=r"model.layers.0.self_attn.q_proj.weight is not finite in float16"):
        merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out", weights=[1e6])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]  # no partial output left


def test_existing_output_is_refused(tmp_path):
    write_tensor_base(tmp_path / "base", llama_like())
    write_mora_adapter(tmp_path / "a", mora_shapes())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        merge_folder(tmp_path / "base", [load_adapter(tmp_path / "a")], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_tied_embeddings_are_untied_when_touched(tmp_path):
    base = llama_like()
    del base["lm_head.weight"]
    write_tensor_base(tmp_path / "base", base, config={"model_type": "llama", "tie_word_embeddings": True})
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file

    adir = tmp_path / "a"
    adir.mkdir()
    lm_a, lm_b = torch.randn(4, H, generator=g), torch.randn(100, 4, generator=g)
    save_file({"base_model.model.lm_head.lora_A.weight": lm_a, "base_model.model.lm_head.lora_B.weight": lm_b},
              str(adir / "adapter_model.safetensors"))
    (adir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                          "target_modules": ["lm_head"]}))
    report = merge_folder(tmp_path / "base", [load_adapter(adir)], tmp_path / "out")
    assert report.untied == {"lm_head.weight": "model.embed_tokens.weight"}
    got = read_folder(tmp_path / "out")
    torch.testing.assert_close(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"], atol=0, rtol=0)
    torch.testing.assert_close(got["lm_head.weight"], base["model.embed_tokens.weight"] + lm_b @ lm_a)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
