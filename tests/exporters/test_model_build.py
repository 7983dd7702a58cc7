"""The meta-device build (exporters.model_build) against the path it replaced, on real tiny models.

The old path is rebuilt here independently: mora_core's folder merge writes the merged
model as float32 safetensors, transformers' own `from_pretrained` loads it (random init,
then the checkpoint), and the exporter's `export_graph` exports it. The new path must
give the same tensors bit for bit (ties kept), the same graph bytes and the same
ONNX Runtime outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.hf_model import build_model, load_config
from exporters.model_build import BaseValues, empty_model, merged_model
from exporters.onnx_export import export_merged_onnx
from exporters.onnx_graph import export_graph, kv_spec, plain_spec
from exporters.providers import open_session
from exporters.safetensors_out import merge_folder
from mora_core.adapter import load_adapter
from mora_core.checkpoint import open_checkpoint
from tests.builders import linear_shapes, write_lora_adapter, write_model_base, write_mora_adapter

LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-build")


def _case(root: Path, kind: str):
    base = root / f"{kind}-base"
    if not base.is_dir():
        write_model_base(base, kind)
        write_mora_adapter(root / f"{kind}-mora", linear_shapes(kind, 2, with_lm_head=kind == "llama"),
                           mora_type=6, fan_in_fan_out=kind == "gpt2")
        write_lora_adapter(root / f"{kind}-lora", base, kind, LORA_TARGETS[kind])
    return base, [load_adapter(root / f"{kind}-mora"), load_adapter(root / f"{kind}-lora")], [1.0, 0.5]


def _old_model(root: Path, kind: str, dtype: torch.dtype) -> torch.nn.Module:
    """The former path: a merged float32 folder loaded by transformers, cast to `dtype`."""
    from transformers import AutoModel, AutoModelForCausalLM

    base, adapters, weights = _case(root, kind)
    merged = root / f"{kind}-merged"
    if not merged.is_dir():
        merge_folder(base, adapters, merged, weights, dtype="float32")
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(merged), attn_implementation="eager", dtype=torch.float32).eval()
    return model.to(dtype)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merged_model_equals_the_from_config_path(root, kind, dtype):
    base, adapters, weights = _case(root, kind)
    new = merged_model(load_config(base), open_checkpoint(base), adapters, weights, dtype=dtype).model
    old = _old_model(root, kind, dtype)
    new_state, old_state = new.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)
    for name, value in old_state.items():
        assert new_state[name].dtype == value.dtype, name
        assert torch.equal(new_state[name], value), name
    assert not [n for n, p in new.named_parameters() if p.device.type == "meta"]
    # ties: the new model shares exactly the parameters the old one shares
    def shared(m):
        return sorted(n for n, _ in m.named_parameters(remove_duplicate=False)
                      if n not in dict(m.named_parameters()))
    assert shared(new) == shared(old)
    if kind == "llama":  # the MoRA on lm_head unties the embeddings
        assert new.get_output_embeddings().weight is not new.get_input_embeddings().weight


def test_empty_model_allocates_no_parameter_memory():
    from tests.builders import _config

    model = empty_model(_config("llama", hidden_size=512, intermediate_size=2048, num_attention_heads=8))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in model.buffers())  # rotary tables are real
    ref = build_model(_config("llama", hidden_size=512, intermediate_size=2048, num_attention_heads=8))
    for (n, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), n


def test_base_values_are_read_on_demand(root):
    base, adapters, weights = _case(root, "llama")
    built = merged_model(load_config(base), open_checkpoint(base), adapters, weights)
    values = BaseValues(built.layout, built.changed())
    assert "lm_head.weight" in values and len(values) == len(built.changed())
    # the untied lm_head starts from the tied embedding of the base
    from safetensors.torch import load_file

    stored = load_file(str(base / "model.safetensors"))
    assert torch.equal(values["lm_head.weight"], stored["model.embed_tokens.weight"])
    with pytest.raises(KeyError):
        values["model.norm.weight"]


@pytest.mark.parametrize("kind,dtype", [("llama", "float32"), ("gpt2", "float16"), ("bert", "float32")])
def test_graph_and_outputs_equal_the_from_config_path(root, kind, dtype):
    import onnx

    base, adapters, weights = _case(root, kind)
    out = root / f"new-{kind}-{dtype}"
    # decoders: the KV graph, traced (the fused writer's graph is checked in test_fused_decoder)
    export_merged_onnx(base, adapters, weights, out, dtype=dtype, validate=False, graph_writer="torch")
    old_dir = root / f"old-{kind}-{dtype}"
    old_dir.mkdir()
    model = _old_model(root, kind, torch.float32)
    task = "encoder" if kind == "bert" else "causal-lm"
    spec = kv_spec(model.config) if task == "causal-lm" else plain_spec(task, model.config)
    export_graph(model, spec, dtype, None, old_dir / "model.onnx", False)
    assert not (out / "model.onnx.data").exists()  # small graph: weights inline, as before
    new_bytes = (out / "model.onnx").read_bytes()
    old_bytes = (old_dir / "model.onnx").read_bytes()
    assert onnx.load_from_string(new_bytes) == onnx.load_from_string(old_bytes)
    assert new_bytes == old_bytes
    ids = np.array([[3, 17, 5, 60, 2, 9]], dtype=np.int64)
    a, b = (_first_output(open_session(d / "model.onnx", "cpu"), ids) for d in (out, old_dir))
    assert np.array_equal(a, b)


def _first_output(session, ids: np.ndarray) -> np.ndarray:
    """Logits (a decoder's prefill through its empty cache) or the hidden states of `ids`."""
    from exporters.ort_decoder import OrtDecoder

    mask = np.ones_like(ids)
    if "logits" in [o.name for o in session.get_outputs()]:
        decoder = OrtDecoder(session)
        return decoder.step(ids, mask, decoder.start(1))[0]
    feed = {i.name: np.zeros_like(ids) for i in session.get_inputs()}
    feed.update(input_ids=ids, attention_mask=mask)
    return session.run(None, feed)[0]


def test_external_data_graph_equals_inline_graph(root):
    """Forcing external data moves the same weights out of the proto, byte for byte."""
    import onnx

    base, adapters, weights = _case(root, "gpt2")
    inline, external = root / "gpt2-inline", root / "gpt2-external"
    export_merged_onnx(base, adapters, weights, inline, validate=False)
    export_merged_onnx(base, adapters, weights, external, validate=False, external_data=True)
    assert (external / "model.onnx.data").is_file()
    a = onnx.load(str(inline / "model.onnx"))
    b = onnx.load(str(external / "model.onnx"))
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        assert ta.name == tb.name
        assert np.array_equal(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb)), ta.name


def test_validation_that_cannot_fit_in_memory_is_refused(root, monkeypatch):
    """Not enough memory for the session or the reference: one clear line, exit-1 class, nothing written."""
    import exporters.memory as memory
    from exporters.errors import ValidationFailed

    base, adapters, weights = _case(root, "gpt2")
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    with pytest.raises(ValidationFailed, match="cannot run in the memory available on cpu.*--no-validate"):
        export_merged_onnx(base, adapters, weights, root / "gpt2-no-memory")
    assert not (root / "gpt2-no-memory").exists()
    assert memory.validation_need(1 << 30, 1 << 30, "float16", "cpu") > memory.validation_need(
        1 << 30, 1 << 30, "float32", "cpu")


def test_validation_never_holds_a_pytorch_model_and_a_session_together(root, monkeypatch):
    """The export's model is gone (collected) before the float32 reference is built (torch.onnx's
    optimizer kept it alive through its last matched graph), and both are gone before the one
    ONNX Runtime session of the validation opens: the peak is the largest of the three, not a sum."""
    import gc
    import weakref

    import exporters.onnx_export as onnx_export
    import exporters.onnx_validation as onnx_validation

    base, adapters, weights = _case(root, "llama")
    built: list[weakref.ref] = []
    alive_at_open: list[int] = []
    real_build, real_open = onnx_export.merged_model, onnx_validation.open_session

    alive_at_build: list[int] = []

    def tracked_build(*args, **kwargs):
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in built))
        out = real_build(*args, **kwargs)
        built.append(weakref.ref(next(out.model.parameters())))  # a weight: the module may go, its tensors stay
        return out

    def tracked_open(*args, **kwargs):
        gc.collect()
        alive_at_open.append(sum(r() is not None for r in built))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "merged_model", tracked_build)
    monkeypatch.setattr(onnx_validation, "open_session", tracked_open)
    # a first export creates onnxscript's rules; frozen (as run_merge and the CLI freeze what
    # their imports left alive), they are invisible to gc.get_objects unless unfrozen
    export_merged_onnx(base, adapters, weights, root / "llama-one-at-a-time-first", validate=False,
                       graph_writer="torch")
    gc.freeze()
    try:
        for writer in ("torch", "fused"):
            built.clear(), alive_at_build.clear(), alive_at_open.clear()
            s = export_merged_onnx(base, adapters, weights, root / f"llama-one-at-a-time-{writer}",
                                   graph_writer=writer)
            assert s["validation"]["passed"] and "generation" in s["validation"]["comparisons"]
            assert len(built) == 2  # the export's model, then the float32 reference
            assert alive_at_build == [0, 0], writer  # the reference is built once the export's model was released
            assert alive_at_open == [0], writer  # one session, opened once both models were released
    finally:
        gc.unfreeze()
