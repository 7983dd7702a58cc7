"""Provider selection (with injected probes: no GPU here) and the comparison arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from exporters.errors import ExportError
from exporters.providers import can_run, choose_provider, open_session, really_used, short_name
from exporters.validate import DEFAULT_TOLERANCES, diff_stats, make_cases, tolerances


def probe_of(*usable: str):
    asked: list[str] = []

    def probe(name: str) -> bool:
        asked.append(name)
        return name in usable

    probe.asked = asked  # type: ignore[attr-defined]
    return probe


@pytest.mark.parametrize("usable, expected", [
    (("cuda", "tensorrt"), "tensorrt"),
    (("cuda",), "cuda"),
    ((), "cpu"),
    (("tensorrt",), "cpu"),  # TensorRT without CUDA cannot run
])
def test_auto_prefers_tensorrt_then_cuda_then_cpu(usable, expected):
    assert choose_provider("auto", probe_of(*usable)) == expected


def test_auto_does_not_probe_tensorrt_without_cuda():
    probe = probe_of()
    choose_provider("auto", probe)
    assert probe.asked == ["cuda"]


def test_explicit_requests():
    assert choose_provider("cpu", probe_of()) == "cpu"
    assert choose_provider("cuda", probe_of("cuda")) == "cuda"
    assert choose_provider("tensorrt", probe_of("cuda", "tensorrt")) == "tensorrt"
    with pytest.raises(ExportError, match="--provider cuda: CUDAExecutionProvider cannot create a session"):
        choose_provider("cuda", probe_of())
    with pytest.raises(ExportError, match="TensorrtExecutionProvider"):
        choose_provider("tensorrt", probe_of("cuda"))
    with pytest.raises(ExportError, match="not one of"):
        choose_provider("rocm", probe_of())


def _has_gpu() -> bool:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def test_real_probes_on_this_machine(capfd):
    """onnxruntime-gpu lists CUDA everywhere; only a machine with a GPU may choose it."""
    assert can_run("cpu")
    chosen = choose_provider("auto")
    assert chosen in (("cuda", "tensorrt") if _has_gpu() else ("cpu",))
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and "Failed to load library" not in out + err


def test_really_used_reads_the_session_not_the_request(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Neg", ["X"], ["Y"])], "g", [x],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    used, chain = really_used(open_session(tmp_path / "m.onnx", "cpu"))
    assert used == "cpu" and chain[-1] == "CPUExecutionProvider"
    assert short_name("CUDAExecutionProvider") == "cuda" and short_name("Foo") == "Foo"


def test_tolerances_default_per_dtype_and_overrides():
    assert tolerances("float32", None, None) == DEFAULT_TOLERANCES["float32"] == (1e-4, 1e-4)
    assert tolerances("float16", None, None) == (2e-2, 2e-2)
    assert tolerances("float32", 1e-3, None) == (1e-3, 1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cases_fit_the_model_and_pad(side):
    cases = make_cases(96, 16, side)
    assert all(c.input_ids.shape[1] <= 16 and c.input_ids.max() < 96 for c in cases)
    assert len({c.input_ids.shape[0] for c in cases}) >= 3
    padded = [c for c in cases if (c.attention_mask == 0).any()]
    assert padded
    for c in padded:
        assert c.attention_mask.sum(axis=1).min() >= 1
        col = 0 if side == "left" else -1
        assert (c.attention_mask[:, col] == 0).any()


def test_diff_stats_ignores_padded_positions_only():
    ref = np.ones((2, 3, 4), dtype=np.float32)
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    out = ref.copy()
    out[1, 0] += 100.0  # a padded position: never served
    s = diff_stats(out, ref, mask, 1e-4, 1e-4)
    assert s["max_abs_diff"] == 0 and s["worst_ratio"] == 0
    out[1, 1, 2] += 1e-3  # a token position
    s = diff_stats(out, ref, mask, 1e-4, 1e-4)
    assert s["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3) and s["worst_ratio"] > 1
    assert s["max_rel_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_diff_stats_flags_nan_and_shape_mismatch():
    ref = np.zeros((1, 2, 3))
    mask = np.ones((1, 2))
    bad = ref.copy()
    bad[0, 1, 1] = np.nan
    assert diff_stats(bad, ref, mask, 1e-4, 1e-4)["worst_ratio"] == float("inf")
    assert diff_stats(np.zeros((1, 2, 4)), ref, mask, 1e-4, 1e-4)["worst_ratio"] == float("inf")


def test_cuda_sessions_ask_for_full_float32():
    from exporters.providers import provider_chain

    assert provider_chain("cpu") == ["CPUExecutionProvider"]
    assert provider_chain("cuda") == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert provider_chain("tensorrt")[0] == "TensorrtExecutionProvider"
