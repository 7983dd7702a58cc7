"""Slots graphs of decoders carry the KV cache of a merged export and generate with an adapter active.

One tiny Llama (untied head, word tokenizer) exported once with slots for a MoRA (type 6)
and a peft LoRA. Independent reference: transformers' own greedy `generate` (its own
cache) on the base with the adapter applied unmerged (`mora_core.forward.apply_unmerged`)
at the weight the adapter file was packed with. Both engines (onnxruntime-genai's
`Adapters` API and our ONNX Runtime loop with `RunOptions`) must produce its tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.errors import ValidationFailed
from exporters.generate import GenerationError, generate
from exporters.slots import export_slots_onnx, pack_adapter
from mora_core.adapter import load_adapter
from tests.builders import (
    linear_shapes,
    swap_key_and_value_presents,
    write_lora_adapter,
    write_model_base,
    write_mora_adapter,
    write_tokenizer,
)
from tests.cli_runner import invoke

pytest.importorskip("onnxruntime_genai")
PROMPT = [3, 14, 15, 9, 26]
NEW = 10
WEIGHT = 0.8


@pytest.fixture(scope="module")
def slots(tmp_path_factory):
    root = tmp_path_factory.mktemp("slot-generation")
    base = write_model_base(root / "base", "llama", tie_word_embeddings=False)
    write_tokenizer(base)
    mora = write_mora_adapter(root / "mora6", linear_shapes("llama"), mora_type=6, seed=2, scale=0.5)
    lora = write_lora_adapter(root / "lora", base, "llama", ["q_proj", "v_proj"], r=4, seed=5)
    summary = export_slots_onnx(base, [load_adapter(mora), load_adapter(lora)], root / "graph")
    packed = root / "mora6.onnx_adapter"
    pack_adapter(load_adapter(mora), root / "graph", packed, weight=WEIGHT)
    return {"root": root, "base": base, "mora": mora, "lora": lora, "graph": root / "graph", "summary": summary,
            "packed": packed}


def _reference(base: Path, adapter: Path | None, weight: float = 1.0) -> list[int]:
    from transformers import AutoModelForCausalLM

    from mora_core.forward import apply_unmerged

    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager").eval()
    adapters = [load_adapter(adapter)] if adapter is not None else []
    with apply_unmerged(model, adapters, [weight] * len(adapters)), torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True,
                             pad_token_id=0)
    return [int(t) for t in out[0, len(PROMPT):]]


def test_slots_graph_has_the_kv_signature_and_is_validated_by_generating(slots):
    from transformers import AutoConfig

    from exporters.onnx_graph import kv_spec
    from exporters.providers import open_session

    s = slots["summary"]
    spec = kv_spec(AutoConfig.from_pretrained(str(slots["base"])))
    sess = open_session(slots["graph"] / "model.onnx", "cpu")
    assert [i.name for i in sess.get_inputs()] == list(spec.input_names)  # the slots are initializers
    assert [o.name for o in sess.get_outputs()] == list(spec.output_names)
    recipe = json.loads((slots["graph"] / "export.json").read_text())
    assert recipe["kv_cache"] is True and recipe["genai_config"] == "genai_config.json"
    assert (slots["graph"] / "genai_config.json").is_file() and s["kv_cache"] is True
    comps = s["validation"]["comparisons"]
    assert {"no adapter: generation", "mora6: generation", "lora: generation"} <= set(comps)
    for name in ("no adapter", "mora6", "lora"):
        gen = comps[f"{name}: generation"]
        assert gen["passed"] and gen["steps"] == 16 and gen["max_abs_diff"] < 1e-4
        assert any(c["padded_rows"] for c in gen["cases"])  # a left-padded batch generated too


@pytest.mark.parametrize("engine", ["genai", "ort"])
def test_generate_with_an_adapter_file_equals_the_unmerged_reference(slots, engine):
    expected = _reference(slots["base"], slots["mora"], WEIGHT)
    assert expected != _reference(slots["base"], None)  # the adapter changes what is generated
    r = generate(slots["graph"], PROMPT, NEW, engine=engine, adapter=slots["packed"])
    assert r.engine == engine and r.tokens == expected
    assert generate(slots["graph"], PROMPT, NEW, engine=engine).tokens == _reference(slots["base"], None)


def test_generate_refuses_adapter_files_that_do_not_fit(slots, tmp_path):
    from exporters.ort_adapter import read_adapter_file, write_adapter_file

    params = read_adapter_file(slots["packed"])
    name = next(iter(params))
    wrong = tmp_path / "wrong.onnx_adapter"
    write_adapter_file(wrong, {name + ".x": params[name]})
    with pytest.raises(GenerationError, match="is not a slot"):
        generate(slots["graph"], PROMPT, 2, adapter=wrong)
    write_adapter_file(wrong, {name: np.zeros((3, 3), dtype=np.float32)})
    with pytest.raises(GenerationError, match="has shape"):
        generate(slots["graph"], PROMPT, 2, adapter=wrong)
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not flatbuffers" * 10)
    with pytest.raises(GenerationError, match="not an ONNX Runtime adapter file"):
        generate(slots["graph"], PROMPT, 2, adapter=tmp_path / "junk.onnx_adapter")


def test_cli_generate_adapter_from_a_file_and_from_a_registry_reference(slots):
    home = slots["root"] / "home"
    pushed = invoke(["push", slots["mora"], "--name", "team/mora", "--base", slots["base"]], {"ADAPTERS_HOME": str(home)})
    assert pushed.code == 0, pushed.err
    by_file = invoke(["generate", slots["graph"], "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW),
                      "--adapter", slots["packed"], "--json"], {"ADAPTERS_HOME": str(home)})
    assert by_file.code == 0, by_file.err
    assert by_file.json()["tokens"] == _reference(slots["base"], slots["mora"], WEIGHT)
    by_ref = invoke(["generate", slots["graph"], "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW),
                     "--adapter", "team/mora:1", "--engine", "ort", "--json"], {"ADAPTERS_HOME": str(home)})
    assert by_ref.code == 0, by_ref.err  # packed (weight 1) and validated for this graph first
    assert by_ref.json()["tokens"] == _reference(slots["base"], slots["mora"], 1.0)
    assert by_ref.json()["adapter"] == "team/mora:1"


@pytest.mark.parametrize("args, message", [
    (["--adapter", "{root}/nope.onnx_adapter"], "no such file"),
    (["--adapter", "team/nope:1"], "team/nope"),
])
def test_cli_generate_bad_adapter_is_one_line(slots, args, message):
    args = [a.format(root=slots["root"]) for a in args]
    r = invoke(["generate", slots["graph"], "--ids", "1,2", *args], {"ADAPTERS_HOME": str(slots["root"] / "h2")})
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err


def test_a_cache_bug_in_a_slots_graph_fails_its_generation_check(slots, monkeypatch):
    """Presents with key and value swapped: prefills are exact (empty past), only generating shows it."""
    swap_key_and_value_presents(monkeypatch)
    out = slots["root"] / "swapped"
    with pytest.raises(ValidationFailed, match="generation") as err:
        export_slots_onnx(slots["base"], [load_adapter(slots["lora"])], out)
    assert "\n" not in str(err.value) and not out.exists()


def test_cli_generate_adapter_from_a_registered_pack_artifact(slots, tmp_path):
    """`--adapter artifact:N`: the registered `adapters pack` output, used as its file is."""
    from registry.api import Registry

    env = {"ADAPTERS_HOME": str(tmp_path / "home")}
    assert invoke(["push", slots["mora"], "--name", "team/mora", "--base", slots["base"]], env).code == 0
    packed = invoke(["pack", "team/mora:1", "--graph", slots["graph"], "-o", tmp_path / "m.onnx_adapter",
                     "--weight", str(WEIGHT), "--json"], env)
    assert packed.code == 0, packed.err
    ref = packed.json()["artifact"]["ref"]
    r = invoke(["generate", slots["graph"], "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW),
                "--adapter", ref, "--engine", "ort", "--json"], env)
    assert r.code == 0, r.err
    assert r.json()["tokens"] == _reference(slots["base"], slots["mora"], WEIGHT) and r.json()["adapter"] == ref

    with Registry.open(home=env["ADAPTERS_HOME"]) as reg:  # an artifact that is not an adapter file
        graph_ref = reg.register_artifact(kind="onnx_slots", path=slots["graph"], recipe={"kind": "onnx_slots"},
                                          inputs=[]).ref
    (tmp_path / "m.onnx_adapter").write_bytes(b"not the packed bytes")
    for bad, message in ((graph_ref, "onnx_slots artifact, not an adapter file"), ("artifact:999", "artifact:999"),
                         (ref, "m.onnx_adapter")):
        r = invoke(["generate", slots["graph"], "--ids", "1,2", "--adapter", bad], env)
        assert r.code == 2 and message in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, (bad, r.err)
