"""KV-cache decoder graphs: generation validation, onnxruntime-genai, and our own ONNX Runtime loop.

Real tiny Qwen2 and GPT-2 bases (with a byte-level BPE tokenizer that onnxruntime-genai
reads), real MoRA folders and real peft LoRA folders, weighted. Independent references:
transformers' own `generate` (its own cache and position handling) on the base with the
adapters applied unmerged, and onnxruntime-genai's own tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.errors import ValidationFailed
from exporters.generate import GenerationError, Sampling, generate
from exporters.onnx_export import export_merged_onnx
from exporters.text_tokenizer import TextTokenizer
from mora_core.adapter import load_adapter
from tests.builders import (
    BPE_VOCAB,
    linear_shapes,
    swap_key_and_value_presents,
    write_bpe_tokenizer,
    write_lora_adapter,
    write_model_base,
    write_mora_adapter,
)

og = pytest.importorskip("onnxruntime_genai")  # a dependency (pyproject); skips only where it is missing

SPECS = {  # kind -> (MoRA type, LoRA targets, weights [mora, lora])
    "qwen2": (6, ["q_proj", "v_proj"], [1.0, 0.5]),
    "gpt2": (1, ["c_attn"], [0.7, 1.0]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generation")


def _inputs(root: Path, kind: str) -> tuple[Path, list[Path], list[float]]:
    base = root / f"{kind}-base"
    mora_type, targets, weights = SPECS[kind]
    if not base.is_dir():
        # untied head: a tiny tied model mostly echoes its last input token
        write_model_base(base, kind, vocab_size=BPE_VOCAB, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
        write_bpe_tokenizer(base)
        layers = 1 if kind == "qwen2" else 2
        write_mora_adapter(root / f"{kind}-mora", linear_shapes(kind, layers), mora_type=mora_type, seed=1,
                           scale=0.05, fan_in_fan_out=kind == "gpt2")
        write_lora_adapter(root / f"{kind}-lora", base, kind, targets)
    return base, [root / f"{kind}-mora", root / f"{kind}-lora"], weights


def _export(root: Path, kind: str, name: str, **kw) -> dict:
    base, folders, weights = _inputs(root, kind)
    out = root / name
    if (out / "export.json").is_file():
        return json.loads((out / "summary.json").read_text())
    s = export_merged_onnx(base, [load_adapter(f) for f in folders], weights, out, **kw)
    (out / "summary.json").write_text(json.dumps(s))
    return s


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def kv_export(request, root):
    return request.param, _export(root, request.param, f"{request.param}-kv")


def _reference_generate(root: Path, kind: str, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy `generate` on the base with the adapters unmerged (its own cache)."""
    from transformers import AutoModelForCausalLM

    from mora_core.forward import apply_unmerged

    base, folders, weights = _inputs(root, kind)
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager").eval()
    with apply_unmerged(model, [load_adapter(f) for f in folders], weights), torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, use_cache=True, eos_token_id=0, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt):]]


def test_generation_is_validated_through_the_cache(kv_export):
    kind, s = kv_export
    v = s["validation"]
    assert v["passed"] and s["kv_cache"] is True
    gen = v["comparisons"]["generation"]
    assert gen["passed"] and gen["steps"] >= 16 and gen["max_abs_diff"] < 1e-4
    by_batch = {c["batch"]: c for c in gen["cases"]}
    assert set(by_batch) == {1, 3} and by_batch[3]["padded_rows"] == 2  # batch > 1, left padding
    assert all(c["token_mismatch"] is None for c in gen["cases"])
    out = Path(s["output"])
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == {"qwen2": "qwen2", "gpt2": "decoder"}[kind]
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["num_key_value_heads"] == (2 if kind == "qwen2" else 4) and dec["head_size"] == 8
    assert cfg["model"]["vocab_size"] == BPE_VOCAB and cfg["model"]["eos_token_id"] == 0
    # the fused Qwen2 graph updates genai's preallocated cache in place; the traced GPT-2 one cannot
    assert cfg["search"]["past_present_share_buffer"] is (kind == "qwen2")


def test_onnxruntime_genai_generates_what_pytorch_generates(kv_export, root):
    """genai drives our graph (its own cache handling) and agrees with transformers' generate."""
    kind, s = kv_export
    prompt = [5, 17, 33, 101, 250, 7]
    model = og.Model(s["output"])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == _reference_generate(root, kind, prompt, 12)
    assert len(set(tokens)) > 1 or tokens[-1] == 0  # not a degenerate constant (or it stopped at eos)


def test_genai_reads_the_copied_tokenizer(kv_export):
    _, s = kv_export
    text = "the lazy fox merges adapters"
    ours = TextTokenizer.from_folder(Path(s["output"]))
    assert ours is not None
    genai_ids = [int(i) for i in og.Tokenizer(og.Model(s["output"])).encode(text)]
    assert genai_ids == ours.encode(text).ids and ours.decode(genai_ids) == text


def test_both_engines_generate_the_same_greedy_tokens(kv_export):
    _, s = kv_export
    prompt = [9, 8, 7, 6, 5]
    a = generate(Path(s["output"]), prompt, 10, engine="genai")
    b = generate(Path(s["output"]), prompt, 10, engine="ort")
    assert (a.engine, b.engine) == ("genai", "ort") and a.provider == b.provider == "cpu"
    assert a.tokens == b.tokens and 1 <= len(a.tokens) <= 10
    assert generate(Path(s["output"]), prompt, 10).engine == "genai"  # auto prefers genai


def test_sampling_is_reproducible_with_a_seed(kv_export):
    _, s = kv_export
    out = Path(s["output"])
    for engine in ("ort", "genai"):
        runs = [generate(out, [1, 2, 3], 12, Sampling(temperature=1.5, top_k=50, seed=4), engine=engine).tokens
                for _ in range(2)]
        assert runs[0] == runs[1]
    sampled = {tuple(generate(out, [1, 2, 3], 12, Sampling(temperature=2.0, seed=k), engine="ort").tokens)
               for k in range(4)}
    assert len(sampled) > 1  # different seeds, different draws: sampling really samples


def test_plain_graph_generates_with_our_loop_and_matches_the_kv_graph(root):
    """`--no-kv-cache`: no genai_config.json, so `auto` takes our loop (re-running the prefix)."""
    kv = _export(root, "qwen2", "qwen2-kv")
    plain = _export(root, "qwen2", "qwen2-plain", kv_cache=False)
    assert plain["kv_cache"] is False and not (Path(plain["output"]) / "genai_config.json").exists()
    assert set(plain["validation"]["comparisons"]) == {"merged_pytorch", "unmerged_pytorch"}
    r = generate(Path(plain["output"]), [4, 40, 44], 8)
    assert r.engine == "ort" and r.extra["kv_cache"] is False
    assert r.tokens == generate(Path(kv["output"]), [4, 40, 44], 8, engine="ort").tokens
    with pytest.raises(GenerationError, match="no genai_config.json"):
        generate(Path(plain["output"]), [4, 40, 44], 8, engine="genai")


def test_bad_generation_input_is_a_generation_error(kv_export):
    _, s = kv_export
    out = Path(s["output"])
    with pytest.raises(GenerationError, match=f"token id {BPE_VOCAB} is outside the vocabulary"):
        generate(out, [1, BPE_VOCAB], 4)
    with pytest.raises(GenerationError, match="context is 64"):
        generate(out, list(range(64)), 4)
    with pytest.raises(GenerationError, match="no model.onnx"):
        generate(out.parent, [1], 4)


def test_a_cache_bug_is_caught_by_the_generation_comparison(root, monkeypatch):
    """Presents returned with key and value swapped: every prefill is exact (the past is empty),
    only decoding through the cache shows it. Validation must fail and leave nothing behind."""
    swap_key_and_value_presents(monkeypatch)
    base, folders, weights = _inputs(root, "qwen2")
    out = root / "qwen2-swapped"
    with pytest.raises(ValidationFailed) as err:
        export_merged_onnx(base, [load_adapter(folders[0])], [1.0], out)
    msg = str(err.value)
    assert "generation vs base + unmerged adapters" in msg and "step" in msg and "\n" not in msg
    assert not out.exists() and not list(root.glob(".qwen2-swapped.partial-*"))
