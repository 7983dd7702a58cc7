"""exporters.fused_decoder: Llama, Mistral and Qwen2 KV-cache graphs written with ONNX Runtime's fused ops.

Real tiny bases, a real MoRA (type 6) and a real peft LoRA folder, weighted. The graphs
are judged by the exporter's own validation (merged and unmerged PyTorch, generation
through the cache with a left-padded batch) and, independently, against the torch
exporter's graph of the same merge run step by step on ONNX Runtime.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from exporters.errors import ExportError, ValidationFailed
from exporters.fused_decoder import fused_refusal
from exporters.onnx_export import export_merged_onnx
from exporters.ort_decoder import OrtDecoder, positions
from exporters.providers import open_session
from mora_core.adapter import load_adapter
from tests.builders import linear_shapes, write_lora_adapter, write_model_base, write_mora_adapter

CASES = {  # name -> (kind, config overrides)
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}}),
    "mistral-window5": ("mistral", {"sliding_window": 5}),  # the window matters within the checked lengths
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fused")


def _inputs(root: Path, name: str):
    kind, overrides = CASES[name]
    base = root / f"{name}-base"
    if not base.is_dir():
        write_model_base(base, kind, tie_word_embeddings=False, **overrides)
        write_mora_adapter(root / f"{name}-mora", linear_shapes(kind, 1), mora_type=6, seed=1, scale=0.05)
        write_lora_adapter(root / f"{name}-lora", base, kind, ["q_proj", "v_proj"])
    return base, [load_adapter(root / f"{name}-mora"), load_adapter(root / f"{name}-lora")], [1.0, 0.5]


def _ops(folder: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_graph_passes_generation_validation_with_left_padding(root, name):
    base, adapters, weights = _inputs(root, name)
    s = export_merged_onnx(base, adapters, weights, root / f"{name}-fused")
    assert s["export"]["exporter"].startswith("exporters.fused_decoder")
    v = s["validation"]
    assert v["passed"] and v["max_abs_diff"] < 1e-5
    gen = v["comparisons"]["generation"]
    assert gen["passed"] and gen["steps"] >= 16 and gen["max_abs_diff"] < 1e-5
    assert {c["batch"]: c["padded_rows"] for c in gen["cases"]} == {1: 0, 3: 2}
    ops = _ops(Path(s["output"]))
    layers = sum(1 for n in s["export"]["inputs"] if n.endswith(".key"))
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["MatMul"] == 4 * layers + 1  # packed q/k/v, o, packed gate/up, down; lm_head
    assert ops["Transpose"] == 0 and ops["Where"] == 1  # one mask bias, built once for all layers


def test_fused_and_traced_graphs_agree_step_by_step(root):
    """Independent of the validation code: both writers' graphs of one merge, driven by our ONNX
    Runtime loop through a left-padded prefill and 6 decode steps, give the same logits and caches."""
    base, adapters, weights = _inputs(root, "qwen2")
    outs = {}
    for writer in ("fused", "torch"):
        s = export_merged_onnx(base, adapters, weights, root / f"qwen2-{writer}-raw", validate=False,
                               graph_writer=writer)
        outs[writer] = Path(s["output"])
    assert _ops(outs["torch"])["GroupQueryAttention"] == 0
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 90, size=(3, 7), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids = np.where(mask == 1, ids, 0)
    decoders = {w: OrtDecoder(open_session(outs[w] / "model.onnx", "cpu")) for w in outs}
    states = {w: d.start(3) for w, d in decoders.items()}
    step_ids, step_mask = ids, mask
    for _ in range(7):
        logits = {}
        for w, d in decoders.items():
            logits[w], states[w] = d.step(step_ids, step_mask, states[w])
        real = step_mask[:, -step_ids.shape[1]:] == 1
        np.testing.assert_allclose(logits["fused"][real], logits["torch"][real], atol=2e-5, rtol=1e-4)
        step_ids = logits["torch"][:, -1].argmax(-1)[:, None].astype(np.int64)
        step_mask = np.concatenate([step_mask, np.ones((3, 1), dtype=np.int64)], axis=1)
    assert positions(step_mask, 1)[2, 0] == 2 + 6  # row 2: 2 real prompt tokens, 6 generated


def test_the_sliding_window_is_part_of_the_mask(root, monkeypatch):
    """Mistral with a 5-token window, written as full attention: validation must catch it."""
    import exporters.fused_decoder as fd

    monkeypatch.setattr(fd, "_window", lambda config, layer: None)
    base, adapters, weights = _inputs(root, "mistral-window5")
    with pytest.raises(ValidationFailed, match="nothing was written"):
        export_merged_onnx(base, adapters, weights, root / "mistral-no-window")
    assert not (root / "mistral-no-window").exists()


def test_the_model_builders_seqlens_fail_on_left_padding(root, monkeypatch):
    """GroupQueryAttention fed onnxruntime-genai's builder contract, `seqlens_k = sum(mask) - 1`
    (keys [0, seqlens_k] valid: right padding), attends to a left-padded row's padding: the
    validation fails. Our `total - 1` for every row plus the mask as a bias is what passes."""
    import exporters.fused_decoder as fd

    def builder_seqlens(w, total32, batch):
        from onnx import TensorProto

        summed = w.one("ReduceSum", ["attention_mask", w.const("/c/axes1", [1])], keepdims=0)
        return w.one("Cast", [w.one("Sub", [summed, w.const("/c/1", [1])])], to=TensorProto.INT32)

    monkeypatch.setattr(fd, "_seqlens_k", builder_seqlens)
    base, adapters, weights = _inputs(root, "llama")
    with pytest.raises(ValidationFailed, match="batch [34]"):
        export_merged_onnx(base, adapters, weights, root / "llama-builder-seqlens")


def test_writer_choice_and_refusals(root, tmp_path):
    from transformers import GPT2Config, LlamaConfig

    assert fused_refusal(LlamaConfig()) is None
    assert "gpt2" in fused_refusal(GPT2Config())
    assert "dynamic" in fused_refusal(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert "hidden_act" in fused_refusal(LlamaConfig(hidden_act="gelu"))
    gpt2 = write_model_base(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ExportError, match="fused graph writer cannot write this model: gpt2"):
        export_merged_onnx(gpt2, [], [], tmp_path / "out", graph_writer="fused")
    base, _, _ = _inputs(root, "llama")
    with pytest.raises(ExportError, match="fused graph writer cannot write this model: the graph has no KV"):
        export_merged_onnx(base, [], [], tmp_path / "out", graph_writer="fused", kv_cache=False)
    with pytest.raises(ExportError, match="graph writer 'onnx' is not one of auto, fused, torch"):
        export_merged_onnx(base, [], [], tmp_path / "out", graph_writer="onnx")
    assert not (tmp_path / "out").exists()


def test_merge_cli_graph_writer_option(root, tmp_path):
    """`adapters merge --to onnx --graph-writer torch` traces a Llama (the escape from the fused
    writer); `fused` on GPT-2 is one error line, exit 2, no output."""
    from tests.cli_runner import invoke

    base, _, _ = _inputs(root, "llama")
    env = {"ADAPTERS_HOME": str(tmp_path / "home")}
    out = tmp_path / "traced"
    r = invoke(["merge", root / "llama-lora", "--base", base, "--to", "onnx", "-o", out, "--graph-writer", "torch",
                "--no-register", "--json"], env)
    assert r.code == 0, r.err
    assert r.json()["export"]["exporter"] == json.loads((out / "export.json").read_text())["exporter"]
    assert not r.json()["export"]["exporter"].startswith("exporters.fused_decoder")
    gpt2 = write_model_base(tmp_path / "gpt2", "gpt2")
    write_lora_adapter(tmp_path / "gpt2-lora", gpt2, "gpt2", ["c_attn"])
    r = invoke(["merge", tmp_path / "gpt2-lora", "--base", gpt2, "--to", "onnx", "-o", tmp_path / "o",
                "--graph-writer", "fused", "--no-register"], env)
    assert r.code == 2 and r.err.count("\n") == 1 and "fused graph writer cannot write this model" in r.err
    assert not (tmp_path / "o").exists()


def test_float16_is_traced_under_auto_and_fused_on_request(root, tmp_path):
    """float16 KV graphs: "auto" traces them (the fused float16 graph carries about twice the
    rounding), "fused" still writes and validates one."""
    base, adapters, weights = _inputs(root, "llama")
    auto = export_merged_onnx(base, adapters, weights, tmp_path / "auto", dtype="float16")
    assert not auto["export"]["exporter"].startswith("exporters.fused_decoder")
    fused = export_merged_onnx(base, adapters, weights, tmp_path / "fused", dtype="float16", graph_writer="fused")
    assert fused["export"]["exporter"].startswith("exporters.fused_decoder")
    assert fused["validation"]["passed"] and fused["validation"]["graph_dtype"] == "float16"
    assert auto["validation"]["passed"]
