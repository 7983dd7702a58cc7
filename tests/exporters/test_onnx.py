"""`export_merged_onnx` on real tiny transformers bases, real ONNX Runtime sessions.

Each export is done once per module (the slow part) and inspected by several tests.
The graphs are also checked against references the exporter does not use itself
(peft's own forward, the graph's declared dynamic axes), so a test can fail even if
the exporter's validation were wrong.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.errors import ExportError, ValidationFailed
from exporters.onnx_export import export_merged_onnx
from exporters.providers import open_session
from mora_core.adapter import load_adapter
from registry.copying import hash_file
from tests.builders import linear_shapes, write_lora_adapter, write_model_base, write_mora_adapter

LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
                "mistral": ["q_proj"], "qwen2": ["q_proj"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


def _base(root: Path, kind: str) -> Path:
    folder = root / f"{kind}-base"
    return folder if folder.is_dir() else write_model_base(folder, kind)


def _mora(root: Path, kind: str, mora_type: int, with_lm_head: bool = False) -> Path:
    layers = 1 if kind in ("mistral", "qwen2") else 2
    folder = root / f"adapter-{kind}-mora{mora_type}{'-head' if with_lm_head else ''}"
    if folder.is_dir():
        return folder
    return write_mora_adapter(folder, linear_shapes(kind, layers, with_lm_head), mora_type=mora_type,
                              seed=1, scale=0.05, fan_in_fan_out=kind == "gpt2")


def _lora(root: Path, kind: str) -> Path:
    folder = root / f"adapter-{kind}-lora"
    if folder.is_dir():
        return folder
    return write_lora_adapter(folder, _base(root, kind), kind, LORA_TARGETS[kind])


def _export(root: Path, name: str, kind: str, folders: list[Path], weights: list[float], **kw) -> dict:
    adapters = [load_adapter(f) for f in folders]
    return export_merged_onnx(_base(root, kind), adapters, weights, root / name, **kw)


@pytest.fixture(scope="module")
def llama_mix(root):
    """Llama-like, tied embeddings, MoRA type 1 (incl. lm_head: forces untying) + peft LoRA at 0.5."""
    return _export(root, "llama-mix", "llama", [_mora(root, "llama", 1, with_lm_head=True), _lora(root, "llama")],
                   [1.0, 0.5])


@pytest.fixture(scope="module")
def gpt2_lora(root):
    """The plain graph (`--no-kv-cache`): input_ids, attention_mask -> logits."""
    return _export(root, "gpt2-lora", "gpt2", [_lora(root, "gpt2")], [1.0], kv_cache=False)


@pytest.fixture(scope="module")
def gpt2_mora(root):
    return _export(root, "gpt2-mora", "gpt2", [_mora(root, "gpt2", 1), _mora(root, "gpt2", 6)], [1.0, -0.7])


@pytest.fixture(scope="module")
def bert_mix(root):
    return _export(root, "bert-mix", "bert", [_mora(root, "bert", 6), _lora(root, "bert")], [1.0, 1.0])


def _session_out(summary: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The graph's first output for (ids, mask); a KV-cache graph runs as a prefill (empty past)."""
    from exporters.ort_decoder import OrtDecoder

    sess = open_session(Path(summary["output"]) / "model.onnx", "cpu")
    if summary.get("kv_cache"):
        decoder = OrtDecoder(sess)
        return decoder.step(ids, mask, decoder.start(len(ids)))[0]
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("fixture", ["llama_mix", "gpt2_lora", "gpt2_mora", "bert_mix"])
def test_export_validates_against_merged_and_unmerged_pytorch(fixture, request):
    s = request.getfixturevalue(fixture)
    v = s["validation"]
    assert v["passed"] and v["provider"] == "cpu" and v["requested_provider"] == "auto"
    assert v["session_providers"][0] == "CPUExecutionProvider"
    decoder_kv = fixture in ("llama_mix", "gpt2_mora")  # decoders default to the KV-cache graph
    assert s["kv_cache"] is decoder_kv
    assert set(v["comparisons"]) == {"merged_pytorch", "unmerged_pytorch"} | ({"generation"} if decoder_kv else set())
    assert (v["atol"], v["rtol"]) == (1e-4, 1e-4)  # float32 defaults
    for key, comp in v["comparisons"].items():
        if key == "generation":
            continue
        assert comp["passed"] and comp["worst_ratio"] <= 1
        shapes = {(c["batch"], c["seq"]) for c in comp["cases"]}
        assert len({b for b, _ in shapes}) >= 3 and len({q for _, q in shapes}) >= 3
        assert any(c["padded_rows"] for c in comp["cases"])
        assert comp["max_abs_diff"] < 1e-4
    assert v["max_abs_diff"] == max(c["max_abs_diff"] for c in v["comparisons"].values())
    assert s["opset"] >= 18 and s["dtype"] == "float32"
    json.dumps(s)  # JSON-able


def test_output_folder_holds_graph_recipe_and_side_files(llama_mix):
    out = Path(llama_mix["output"])
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "export.json", "config.json"} <= names
    assert not list(out.parent.glob(".llama-mix.partial-*"))
    recipe = json.loads((out / "export.json").read_text())
    assert recipe == llama_mix["export"]
    assert recipe["files"]["model.onnx"]["sha256"] == hash_file(out / "model.onnx")[0]
    assert [a["weight"] for a in recipe["adapters"]] == [1.0, 0.5]
    assert [a["kind"] for a in recipe["adapters"]] == ["mora", "lora"]
    assert recipe["validation"]["passed"] and recipe["kv_cache"] is True
    assert recipe["genai_config"] == "genai_config.json" and (out / "genai_config.json").is_file()
    assert "past_key_values.1.value" in recipe["inputs"] and "present.0.key" in recipe["outputs"]
    assert "torch" in recipe["tools"] and "onnx" in recipe["tools"]


def test_tied_embeddings_are_untied_when_an_adapter_touches_lm_head(llama_mix, root):
    assert llama_mix["untied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert llama_mix["export"]["untied"] == llama_mix["untied"]
    cfg = json.loads((Path(llama_mix["output"]) / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    base_cfg = json.loads((root / "llama-base" / "config.json").read_text())
    assert base_cfg["tie_word_embeddings"] is True


def test_untouched_tied_base_stays_tied(gpt2_mora):
    assert gpt2_mora["untied"] == {}


@pytest.mark.parametrize("fixture", ["gpt2_lora", "bert_mix"])
def test_plain_graph_declares_dynamic_batch_and_sequence(fixture, request):
    s = request.getfixturevalue(fixture)
    sess = open_session(Path(s["output"]) / "model.onnx", "cpu")
    ins = {i.name: i.shape for i in sess.get_inputs()}
    bert = fixture == "bert_mix"
    assert set(ins) == {"input_ids", "attention_mask"} | ({"token_type_ids"} if bert else set())
    for shape in ins.values():
        assert all(isinstance(d, str) for d in shape), shape
    (out,) = sess.get_outputs()
    assert out.name == ("last_hidden_state" if bert else "logits")
    ids = np.arange(5 * 41, dtype=np.int64).reshape(5, 41) % 90
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if bert:
        feed["token_type_ids"] = np.zeros_like(ids)
    assert sess.run(None, feed)[0].shape[:2] == (5, 41)
    assert not (Path(s["output"]) / "genai_config.json").exists()


def test_bert_graph_uses_token_type_ids(bert_mix):
    """Segment ids change BERT's output: the graph must honour them, not ignore the input."""
    sess = open_session(Path(bert_mix["output"]) / "model.onnx", "cpu")
    ids = np.arange(2 * 9, dtype=np.int64).reshape(2, 9) % 90
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    zeros = sess.run(None, feed)[0]
    feed["token_type_ids"] = np.ones_like(ids)
    assert np.abs(sess.run(None, feed)[0] - zeros).max() > 1e-3


def test_gpt2_conv1d_lora_graph_equals_peft_forward(gpt2_lora, root):
    """Independent reference: peft's own LoRA forward on the base (fan_in_fan_out Conv1D)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / "gpt2-base"), attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, str(_lora(root, "gpt2"))).eval()
    ids = np.random.default_rng(3).integers(0, 96, size=(3, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = _session_out(gpt2_lora, ids, mask)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    with peft_model.disable_adapter(), torch.no_grad():
        without = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - without).max() > 1e-3  # the adapter really changed the model


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_other_llama_like_architectures(kind, root):
    s = _export(root, f"{kind}-m1", kind, [_mora(root, kind, 1), _lora(root, kind)], [1.0, 1.0])
    assert s["validation"]["passed"] and s["model_type"] == kind


def test_float16_with_external_data(root):
    s = _export(root, "llama-fp16", "llama", [_mora(root, "llama", 6)], [1.0], dtype="float16",
                external_data=True)
    out = Path(s["output"])
    assert (out / "model.onnx.data").is_file()
    assert set(s["files"]) == {"model.onnx", "model.onnx.data"}
    assert s["files"]["model.onnx.data"]["sha256"] == hash_file(out / "model.onnx.data")[0]
    v = s["validation"]
    assert v["passed"] and (v["atol"], v["rtol"]) == (2e-2, 2e-2) and v["graph_dtype"] == "float16"
    sess = open_session(out / "model.onnx", "cpu")
    assert sess.get_outputs()[0].type == "tensor(float16)"
    assert v["max_abs_diff"] > 0  # fp16 really rounds: the comparison is not vacuous


def test_no_validate_returns_none_and_writes(root):
    s = _export(root, "bert-novalidate", "bert", [_mora(root, "bert", 1)], [1.0], validate=False)
    assert s["validation"] is None and s["export"]["validation"] is None
    assert (Path(s["output"]) / "model.onnx").is_file()


# --------------------------------------------------------------------------- failures


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.partial-")]


def test_wrong_merge_is_caught_by_the_unmerged_comparison(root, monkeypatch):
    """A merge that silently drops the second adapter: export == merged model, but != the truth."""
    import exporters.model_build as mb

    real = mb.merge_plan
    monkeypatch.setattr(mb, "merge_plan", lambda layout, adapters, weights: real(layout, adapters[:1], weights[:1]))
    with pytest.raises(ValidationFailed) as err:
        _export(root, "gpt2-wrong", "gpt2", [_mora(root, "gpt2", 1), _lora(root, "gpt2")], [1.0, 1.0])
    msg = str(err.value)
    assert "unmerged" in msg and "atol" in msg and "\n" not in msg
    assert _leftovers(root, "gpt2-wrong") == []


def test_perturbed_weight_is_caught(root, monkeypatch):
    import exporters.model_build as mb

    real = mb.merge_tensor

    def perturbed(base, ops, **kw):
        out = real(base, ops, **kw)
        if kw.get("name") == "encoder.layer.1.output.dense.weight":
            # the same perturbation each time: the export and the merged reference both get it
            out = out + 1e-2 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        return out

    monkeypatch.setattr(mb, "merge_tensor", perturbed)
    with pytest.raises(ValidationFailed, match="unmerged"):
        _export(root, "bert-wrong", "bert", [_mora(root, "bert", 6)], [1.0])
    assert _leftovers(root, "bert-wrong") == []


def test_tolerance_too_tight_fails(root):
    with pytest.raises(ValidationFailed, match="max abs diff"):
        _export(root, "qwen2-tight", "qwen2", [_mora(root, "qwen2", 1)], [1.0], atol=1e-12, rtol=0.0)
    assert _leftovers(root, "qwen2-tight") == []


def test_unsupported_architecture_is_named(tmp_path, root):
    base = tmp_path / "neox"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    (base / "model.safetensors").write_bytes((root / "llama-base" / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="GPTNeoXForCausalLM.*gpt_neox.*supported: bert, gpt2, llama"):
        export_merged_onnx(base, [], [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_config_and_bad_options(tmp_path, root):
    base = tmp_path / "noconfig"
    base.mkdir()
    with pytest.raises(ExportError, match="config.json: not found"):
        export_merged_onnx(base, [], [], tmp_path / "out")
    with pytest.raises(ExportError, match="dtype 'bfloat16'"):
        export_merged_onnx(root / "llama-base", [], [], tmp_path / "out", dtype="bfloat16")
    with pytest.raises(ExportError, match="--opset 17: the exporter writes opsets 18 to 23"):
        export_merged_onnx(root / "llama-base", [], [], tmp_path / "out", opset=17)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_merged_onnx(root / "llama-base", [], [], tmp_path / "full")
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_is_a_merge_error(tmp_path, root):
    from mora_core.errors import MoraCoreError

    with pytest.raises(MoraCoreError):
        _export(root, "bert-with-llama", "bert", [_mora(root, "llama", 1)], [1.0])
    assert _leftovers(root, "bert-with-llama") == []


def test_lora_on_a_tied_input_embedding_unties_and_matches_peft(root):
    """peft LoRA on `embed_tokens` of a tied base: lm_head must keep the *base* embedding.

    Checked against peft's own forward (not mora_core's), at an explicit opset.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = write_lora_adapter(root / "adapter-llama-lora-embed", _base(root, "llama"), "llama",
                                ["embed_tokens", "q_proj"])
    s = _export(root, "llama-embed", "llama", [folder], [1.0], opset=18)
    assert s["untied"] == {"lm_head.weight": "model.embed_tokens.weight"} and s["opset"] == 18
    assert s["validation"]["passed"]
    base = AutoModelForCausalLM.from_pretrained(str(root / "llama-base"), attn_implementation="eager")
    with warnings.catch_warnings():  # peft warns about adapting a tied layer
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = np.random.default_rng(5).integers(0, 96, size=(2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(_session_out(s, ids, mask), ref, atol=1e-4, rtol=1e-4)


def test_bfloat16_base_exports_as_float32(root, tmp_path):
    base = write_model_base(tmp_path / "bf16-base", "qwen2", dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    s = export_merged_onnx(base, [load_adapter(_mora(root, "qwen2", 6))], [1.0], tmp_path / "out")
    assert s["validation"]["passed"] and s["dtype"] == "float32"
