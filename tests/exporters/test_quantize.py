"""`--dtype int4`: MatMulNBits graphs validated against the float32 references, on real tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporters.errors import ValidationFailed
from exporters.onnx_export import export_merged_onnx
from exporters.validate import DEFAULT_TOLERANCES
from mora_core.adapter import load_adapter
from tests.builders import linear_shapes, write_lora_adapter, write_model_base, write_mora_adapter


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int4")


def _inputs(root: Path, kind: str, lora_targets: list[str]):
    base = root / f"{kind}-base"
    if not base.is_dir():
        write_model_base(base, kind)
        write_mora_adapter(root / f"{kind}-mora", linear_shapes(kind, 2), mora_type=1, fan_in_fan_out=kind == "gpt2")
        write_lora_adapter(root / f"{kind}-lora", base, kind, lora_targets)
    return base, [load_adapter(root / f"{kind}-mora"), load_adapter(root / f"{kind}-lora")]


def _matmulnbits(path: Path) -> list:
    import onnx

    model = onnx.load(str(path))
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("kind,targets,expected_nodes", [
    # the fused Llama graph: packed q/k/v, o, packed gate/up, down per layer + lm_head
    ("llama", ["q_proj", "v_proj"], 2 * 4 + 1),
    ("gpt2", ["c_attn"], 2 * 4 + 1),  # Conv1D Gemms rewritten as MatMul, + lm_head
])
def test_int4_export_validates_within_its_tolerance(root, kind, targets, expected_nodes):
    import onnx

    base, adapters = _inputs(root, kind, targets)
    out = root / f"{kind}-int4"
    s = export_merged_onnx(base, adapters, [1.0, 0.5], out, dtype="int4")
    v = s["validation"]
    atol, rtol = DEFAULT_TOLERANCES["int4"]
    assert v["passed"] and (v["atol"], v["rtol"]) == (atol, rtol)
    assert set(v["comparisons"]) == {"merged_pytorch", "unmerged_pytorch", "generation"}
    for c in v["comparisons"].values():  # int4 is not exact, and within its tolerance
        assert c["criterion"] == "rel_rms" and 0 < c["max_rel_rms"] < rtol
        assert c["min_top1_agreement"] is not None
    nodes = _matmulnbits(out / "model.onnx")
    assert len(nodes) == expected_nodes
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    recipe = json.loads((out / "export.json").read_text())
    assert recipe["dtype"] == "int4" and recipe["quantization"]["nodes"] == expected_nodes
    assert recipe["outputs"]["logits"]["dtype"] == "float32"
    assert not list(out.glob(".float32*"))  # the intermediate float32 graph is gone
    # the weights are packed 4-bit blocks: [out, in/32, 16] uint8, no float32 copy left beside them
    model = onnx.load(str(out / "model.onnx"))
    packed = {t.name: t for t in model.graph.initializer}
    for n in nodes:
        b = packed[n.input[1]]
        assert b.data_type == onnx.TensorProto.UINT8 and b.dims[-1] == 16, n.name


def test_broken_quantisation_fails_validation(root, monkeypatch):
    """A packing bug (the two 4-bit values of each byte swapped): the graph runs, validation refuses it."""
    import onnx

    import exporters.onnx_export as ox

    real = ox.quantize_int4

    def broken(src, dst, external):
        info = real(src, dst, external)
        model = onnx.load(str(dst))
        packed = {t.name: t for t in model.graph.initializer}
        for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
            b = packed[node.input[1]]
            value = onnx.numpy_helper.to_array(b)
            b.CopyFrom(onnx.numpy_helper.from_array(((value >> 4) | (value << 4)).astype(np.uint8), b.name))
        onnx.save(model, str(dst))
        return info

    monkeypatch.setattr(ox, "quantize_int4", broken)
    base, adapters = _inputs(root, "llama", ["q_proj", "v_proj"])
    with pytest.raises(ValidationFailed, match="validation failed"):
        export_merged_onnx(base, adapters, [1.0, 0.5], root / "llama-broken", dtype="int4")
    assert not (root / "llama-broken").exists()


def test_relative_rms_criterion():
    from exporters.validate import diff_stats

    ref = np.random.default_rng(0).normal(size=(1, 4, 50))
    mask = np.ones((1, 4), dtype=np.int64)
    s = diff_stats(ref * 1.05, ref, mask, 0.0, 0.5, norm=True)
    assert s["rel_rms"] == pytest.approx(0.05) and s["worst_ratio"] == pytest.approx(0.1)
    assert s["top1_agreement"] == 1.0
    assert diff_stats(-ref, ref, mask, 0.0, 0.5, norm=True)["worst_ratio"] == pytest.approx(4.0)
    # element-wise criterion unchanged when norm is off
    assert diff_stats(ref * 1.05, ref, mask, 1e-4, 1e-4)["worst_ratio"] > 1
