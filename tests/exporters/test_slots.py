"""Slot graphs in the library: MoRA's structured operators, mixed-adapter batches, refusals, failures.

The mixed graph is exported once (LoRA, MoRA type 1, MoRA type 6 on a tiny Llama) and
run with LoRA, MoRA and base rows in one padded batch; each row is checked against peft's
own forward (LoRA) or the unmerged MoRA forward run on that row alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.errors import ExportError, ValidationFailed
from exporters.slots import export_slots_onnx, pack_adapter
from mora_core.adapter import load_adapter
from mora_core.mora import MoraOperator
from tests.builders import linear_shapes, write_lora_adapter, write_model_base, write_mora_adapter

SHAPES = [(32, 32, 8), (32, 16, 12), (64, 32, 10), (5, 40, 8), (48, 7, 6), (33, 97, 16), (7, 3, 10), (3, 40, 10)]


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
def test_structured_branch_equals_the_operator(mora_type):
    """The export-side MoRA (reshape/sum/gather/rotate) equals mora_core's forward and dense delta."""
    from exporters.slot_ops import MoraBranch, mora_dense_matrices

    g = torch.Generator().manual_seed(mora_type)
    for in_f, out_f, r in SHAPES:
        if mora_type == 6 and r % 2:
            continue
        op = MoraOperator(in_f, out_f, r, mora_type)
        m = torch.randn(r, r, generator=g, dtype=torch.float64)
        x = torch.randn(2, 5, in_f, generator=g, dtype=torch.float64)
        expected = x @ op.delta(m).T  # the dense definition, independent of both forwards
        torch.testing.assert_close(MoraBranch(op)(x, m), expected, atol=1e-12, rtol=1e-12)
        if mora_type == 6:  # blocks whose results are cut off by out_features are never built
            assert MoraBranch(op).compress(x).shape[-2] == min(op.n_blocks, -(-out_f // r))
        a, b = mora_dense_matrices(op, m)
        torch.testing.assert_close((x @ a.T) @ b.T, expected, atol=1e-12, rtol=1e-12)
        stack = torch.stack([m.T, -2 * m.T, torch.zeros_like(m)])  # adapters 0, 1 and the base
        rows = MoraBranch(op).rows(x, stack, torch.tensor([1, 2]))
        torch.testing.assert_close(rows[0], -2 * expected[0], atol=1e-12, rtol=1e-12)
        assert rows[1].abs().max() == 0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    base = write_model_base(root / "base", "llama")
    folders = [write_lora_adapter(root / "lora", base, "llama", ["q_proj", "v_proj"], r=4, seed=5),
               write_mora_adapter(root / "mora1", linear_shapes("llama"), mora_type=1, seed=1, scale=0.05),
               write_mora_adapter(root / "mora6", linear_shapes("llama"), mora_type=6, seed=2, scale=0.05)]
    summary = export_slots_onnx(base, [load_adapter(f) for f in folders], root / "graph", mixed=True)
    return {"root": root, "base": base, "folders": folders, "summary": summary}


def _base_model(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager").eval()


def test_mixed_graph_validated_row_by_row(mixed):
    v = mixed["summary"]["validation"]
    assert v["passed"]
    comp = v["comparisons"]["mixed_rows"]
    assert len(comp["cases"]) == 5 * 4 and comp["max_abs_diff"] < 1e-4  # every case x 4 row assignments


def test_mixed_kv_graph_generates_each_row_with_its_adapter(mixed):
    """Prefill + 16 greedy steps through the cache with LoRA, MoRA t1, MoRA t6 and base rows in
    one left-padded batch, each row against the base with its own adapter unmerged."""
    gens = {k: c for k, c in mixed["summary"]["validation"]["comparisons"].items() if k.endswith(": generation")}
    assert gens and all(c["passed"] and c["steps"] == 16 and c["max_abs_diff"] < 1e-4 for c in gens.values())
    batched = [c for c in gens.values() if len(c["rows"]) == 3]
    assert {j for c in batched for j in c["rows"]} == {-1, 0, 1, 2}  # every adapter and the base had a row
    assert all(len(set(c["rows"])) == 3 and c["cases"][0]["padded_rows"] for c in batched)


def test_mixed_generation_check_fails_when_rows_get_the_wrong_adapter(mixed):
    """The check's references route row i to adapter i of the list given: the graph's stacks in
    another order (LoRA and MoRA t6 swapped) must fail, while generating too."""
    from transformers import AutoConfig

    from exporters.onnx_graph import kv_spec
    from exporters.slot_validation import validate_mixed

    base, folders = mixed["base"], mixed["folders"]
    wrong = [load_adapter(folders[i]) for i in (2, 1, 0)]
    spec = kv_spec(AutoConfig.from_pretrained(str(base)))
    report = validate_mixed(Path(mixed["summary"]["output"]) / "model.onnx", _base_model(base), spec, wrong, "cpu",
                            "cpu", 1e-4, 1e-4, "float32")
    assert not report["passed"] and "\n" not in report["failure"]
    gens = {k: c for k, c in report["comparisons"].items() if k.endswith(": generation")}
    failed = {k for k, c in gens.items() if not c["passed"]}
    # rows with MoRA t1 (index 1) or the base keep their adapter: only rows using 0 or 2 may fail
    assert failed == {k for k, c in gens.items() if {0, 2} & set(c["rows"])} and failed


def test_a_cache_bug_in_a_mixed_graph_fails_its_generation_check(mixed, monkeypatch):
    """Presents with key and value swapped: the row-by-row prefills pass, generating does not."""
    import exporters.slots as slots_mod
    from tests.builders import swap_key_and_value_presents

    seen = {}
    real = slots_mod.validate_mixed

    def keep_report(*args, **kwargs):
        seen["report"] = real(*args, **kwargs)
        return seen["report"]

    monkeypatch.setattr(slots_mod, "validate_mixed", keep_report)
    swap_key_and_value_presents(monkeypatch)
    out = mixed["root"] / "swapped"
    with pytest.raises(ValidationFailed, match="generation") as err:
        export_slots_onnx(mixed["base"], [load_adapter(mixed["folders"][0])], out, mixed=True)
    assert "\n" not in str(err.value) and not out.exists()
    comps = seen["report"]["comparisons"]
    assert comps["mixed_rows"]["passed"] and not all(c["passed"] for k, c in comps.items() if "generation" in k)


def test_mixed_batch_of_lora_mora_and_base_rows(mixed):
    from peft import PeftModel

    from exporters.ort_decoder import OrtDecoder
    from exporters.providers import open_session
    from mora_core.forward import apply_unmerged

    sess = open_session(Path(mixed["summary"]["output"]) / "model.onnx", "cpu")
    names = [i.name for i in sess.get_inputs()]  # a merged export's KV signature, plus adapter_index
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[-1] == "adapter_index"
    assert mixed["summary"]["kv_cache"] is True and not (Path(mixed["summary"]["output"]) / "genai_config.json").exists()
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 96, size=(5, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    for row, pad in enumerate([0, 3, 0, 6, 2]):
        mask[row, :pad] = 0
    index = np.array([2, -1, 0, 1, 0], dtype=np.int64)
    decoder = OrtDecoder(sess, extra_feed={"adapter_index": index})
    got = decoder.step(ids, mask, decoder.start(len(ids)))[0]  # a prefill through the empty cache
    lora = PeftModel.from_pretrained(_base_model(mixed["base"]), str(mixed["folders"][0])).eval()
    for row, j in enumerate(index):
        keep = mask[row].astype(bool)
        one_ids, one_mask = torch.from_numpy(ids[row:row + 1, keep]), torch.ones(1, int(keep.sum()), dtype=torch.long)
        with torch.no_grad():
            if j == 0:
                ref = lora(input_ids=one_ids, attention_mask=one_mask).logits
            else:
                model = _base_model(mixed["base"])
                adapters = [] if j == -1 else [load_adapter(mixed["folders"][j])]
                with apply_unmerged(model, adapters):
                    ref = model(input_ids=one_ids, attention_mask=one_mask).logits
        np.testing.assert_allclose(got[row, keep], ref[0].numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(got[0] - got[3]).max() > 1e-3  # rows really use different adapters


def test_mixed_graph_has_no_slots_to_pack(mixed):
    with pytest.raises(ExportError, match="mixed graph"):
        pack_adapter(load_adapter(mixed["folders"][0]), Path(mixed["summary"]["output"]),
                     mixed["root"] / "x.onnx_adapter")


def test_dora_cannot_be_slotted(mixed, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "dora"
    model = get_peft_model(_base_model(mixed["base"]), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                                                  init_lora_weights=False))
    model.save_pretrained(str(folder))
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    with pytest.raises(ExportError, match="Dora update cannot be served"):
        export_slots_onnx(mixed["base"], [load_adapter(folder)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pack_that_fails_validation_keeps_nothing(tmp_path, monkeypatch):
    """A pack whose file does not compute the adapter (a wrong fold) fails hard, leaving no file."""
    import exporters.slots as slots

    root = tmp_path
    base = write_model_base(root / "base", "gpt2")
    folder = write_mora_adapter(root / "mora", linear_shapes("gpt2"), mora_type=2, seed=4, scale=0.05,
                                fan_in_fan_out=True)
    graph = root / "graph"
    summary = export_slots_onnx(base, [load_adapter(folder)], graph)
    assert summary["validation"]["passed"]  # GPT-2's Conv1D (fan_in_fan_out) served right
    real = slots.parameters
    monkeypatch.setattr(slots, "parameters", lambda pairs, weight, dtype: real(pairs, weight * 1.5, dtype))
    with pytest.raises(ValidationFailed, match="validation failed on cpu"):
        pack_adapter(load_adapter(folder), graph, root / "m.onnx_adapter")
    assert [p.name for p in root.iterdir() if "onnx_adapter" in p.name] == []


def test_adapter_file_read_back_owns_its_arrays(tmp_path):
    """read_adapter_file's arrays stay valid after ONNX Runtime released the values they came from
    (they used to be views of freed memory: garbage once it was reused)."""
    import gc

    from exporters.ort_adapter import read_adapter_file, write_adapter_file

    g = np.random.default_rng(0)
    params = {f"m{i}.lora_B": g.standard_normal((48, 6)).astype(np.float32) for i in range(4)}
    write_adapter_file(tmp_path / "a.onnx_adapter", params)
    got = read_adapter_file(tmp_path / "a.onnx_adapter")
    churn = [np.full((48, 6), 7.0, np.float32) for _ in range(500)]  # reuse whatever was freed
    gc.collect()
    assert all(a.flags["OWNDATA"] or a.base is None or isinstance(a.base, np.ndarray) for a in got.values())
    for k, v in params.items():
        np.testing.assert_array_equal(got[k], v)
    del churn


@pytest.mark.parametrize("write, message", [
    (lambda p: None, "no export.json"),
    (lambda p: p.write_text('{"format": "x", "format": "y"}'), "appears twice"),
    (lambda p: p.write_text('{"format": NaN}'), "NaN"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    (lambda p: p.write_text('{"format": "merged"}'), "not a slots graph"),
])
def test_graph_recipe_is_read_strictly(tmp_path, write, message):
    """`pack --graph DIR` reads DIR/export.json under the folder rule and the strict JSON reader:
    a FIFO never blocks, duplicate keys and NaN are refused, each as one ExportError."""
    from exporters.slots import read_slots_recipe

    write(tmp_path / "export.json")
    with pytest.raises(ExportError, match=message):
        read_slots_recipe(tmp_path)


def test_float16_slots_graph_validates_and_serves_a_packed_adapter(tmp_path):
    """`--dtype float16`: the base weights and the slots are float16 in the graph, the export is
    validated against the float32 unmerged reference (fp16 tolerances), and a packed MoRA type 6
    file passes the same check."""
    import onnx

    base = write_model_base(tmp_path / "base", "llama")
    folder = write_mora_adapter(tmp_path / "m6", linear_shapes("llama"), mora_type=6, seed=2, scale=0.05)
    summary = export_slots_onnx(base, [load_adapter(folder)], tmp_path / "graph", dtype="float16")
    assert summary["dtype"] == "float16" and summary["validation"]["passed"]
    graph = onnx.load(str(tmp_path / "graph" / "model.onnx"), load_external_data=False)
    kinds = {i.data_type for i in graph.graph.initializer if len(i.dims) == 2}
    assert kinds == {onnx.TensorProto.FLOAT16}, kinds  # matrices (base and slots) are float16
    packed = pack_adapter(load_adapter(folder), tmp_path / "graph", tmp_path / "m6.onnx_adapter")
    assert packed["dtype"] == "float16" and packed["validation"]["passed"]
    assert 0 < packed["validation"]["max_abs_diff"] < 0.02
