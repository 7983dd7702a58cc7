"""Every builder the tests share: base folders, tiny transformers models, adapter folders, golden vectors.

All are real files: safetensors written by the safetensors library, configs as PEFT and
transformers write them, LoRA folders saved by real peft, MoRA folders in the layout of
the paper's peft fork (two identical `r_hat x r_hat` copies).

- tensor bases: `write_tensor_base(folder, tensors, shards)`, `llama_like()`, `mora_shapes()`
- tiny transformers bases: `write_model_base(folder, kind)`, `build_model(kind)`, `linear_shapes(kind)`
- adapters: `write_mora_adapter` (+ `mora_matrices` to read M back), `write_lora_adapter` (peft),
  `write_adapter` (a small LoRA/MoRA on q_proj, numpy only: registry tests need no torch)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from mora_core.mora import mora_rank

# shared/ lies beside the checkout (CI: a clone with shared/ beside it; worktrees: further up)
GOLDEN = next((p / "shared" / "golden" / "mora" for p in Path(__file__).resolve().parents
               if (p / "shared" / "golden" / "mora" / "cases.json").is_file()),
              Path(__file__).resolve().parents[2] / "shared" / "golden" / "mora")
VOCAB = 96
HIDDEN = 32
H, I = 48, 80  # noqa: E741  (hidden and intermediate sizes of the tensor-level Llama-like bases)


def golden_dir() -> Path:
    """The paper-implementation vectors, in shared/ beside the checkout."""
    if not (GOLDEN / "cases.json").is_file():
        raise FileNotFoundError(f"golden vectors not found at {GOLDEN}")
    return GOLDEN


# ----------------------------------------------------------------------------- tensor-level bases

def llama_like(layers: int = 3, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(100, H, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj", (H, H)), ("self_attn.v_proj", (H, H)),
                         ("mlp.up_proj", (I, H)), ("mlp.down_proj", (H, I))):
            t[p + n + ".weight"] = torch.randn(*shape, generator=g) * 0.1
        t[p + "input_layernorm.weight"] = torch.ones(H)
    t["model.norm.weight"] = torch.ones(H)
    t["lm_head.weight"] = torch.randn(100, H, generator=g)
    return {k: v.to(dtype) for k, v in t.items()}


def mora_shapes(layers: int = 3) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        out[f"model.layers.{i}.self_attn.q_proj"] = (H, H)
        out[f"model.layers.{i}.mlp.down_proj"] = (I, H)
    return out


def write_tensor_base(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
               config: dict | None = None) -> Path:
    """A model folder: one file, or `shards` files with an HF index, plus config/tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "tie_word_embeddings": False}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return folder


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


# ----------------------------------------------------------------------------- adapters

def write_mora_adapter(folder: Path, shapes: dict[str, tuple[int, int]], r: int = 8, mora_type: int = 1,
                       seed: int = 0, scale: float = 0.02, fan_in_fan_out: bool = False,
                       extra_config: dict | None = None) -> Path:
    """A MoRA folder as the paper's peft fork saves it: two identical r_hat x r_hat copies.

    `shapes` maps module path -> (in_features, out_features). Returns the folder
    (`mora_matrices(folder)` gives the M per module back).
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_f, out_f) in shapes.items():
        rh = mora_rank(in_f, out_f, r, mora_type)
        m = torch.randn(rh, rh, generator=g) * scale
        tensors[f"base_model.model.{module}.lora_A.weight"] = m
        tensors[f"base_model.model.{module}.lora_B.weight"] = m.clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "use_mora": True, "mora_type": mora_type, "r": r, "lora_alpha": 16,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}), "fan_in_fan_out": fan_in_fan_out,
           "bias": "none", "task_type": "CAUSAL_LM"}
    cfg.update(extra_config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def mora_matrices(folder: Path) -> dict[str, torch.Tensor]:
    """module path -> M of a MoRA folder written by `write_mora_adapter`."""
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    return {k[len("base_model.model."):-len(".lora_A.weight")]: v for k, v in t.items() if k.endswith(".lora_A.weight")}


def write_adapter(folder: Path, *, kind: str = "lora", r: int = 4, seed: int = 0, modules: int = 2,
                  dim: int = 16, mora_type: int = 1, scale: float = 0.1) -> Path:
    """A real PEFT adapter folder: LoRA (A [r,in], B [out,r]) or MoRA (two identical r_hat^2 copies)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(modules):
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        if kind == "mora":
            rh = int(math.sqrt((dim + dim) * r) + 0.5)
            if mora_type == 6:
                rh -= rh % 2
            m = (rng.standard_normal((rh, rh)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = m
            tensors[f"{prefix}.lora_B.weight"] = m.copy()
        else:
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, dim)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((dim, r)) * scale).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"],
           "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    if kind == "mora":
        cfg.update(use_mora=True, mora_type=mora_type)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


# ----------------------------------------------------------------------------- tiny transformers models

def _config(kind: str, **overrides):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = {"vocab_size": VOCAB, "use_cache": False}
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common)
    elif kind == "mistral":
        cfg = MistralConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
                            tie_word_embeddings=False, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, **common)
    elif kind == "bert":
        cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64, **common)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised model (causal LM, or the bare encoder for BERT)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(kind, **overrides)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # make norms and biases non-trivial so that mistakes show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def write_model_base(folder: Path, kind: str, seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> Path:
    """Save a tiny `kind` model as a transformers folder (config.json + model.safetensors)."""
    model = build_model(kind, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder))
    return folder


# module path (as in the base model) -> (in_features, out_features), for MoRA folders
def linear_shapes(kind: str, layers: int = 2, with_lm_head: bool = False) -> dict[str, tuple[int, int]]:
    """Targetable projections of the tiny `kind` models, with their (in, out) features."""
    kv = HIDDEN // 2  # 2 kv heads of 8
    out: dict[str, tuple[int, int]] = {}
    for i in range(layers):
        if kind in ("llama", "mistral", "qwen2"):
            p = f"model.layers.{i}"
            out.update({f"{p}.self_attn.q_proj": (HIDDEN, HIDDEN), f"{p}.self_attn.v_proj": (HIDDEN, kv),
                        f"{p}.mlp.down_proj": (64, HIDDEN)})
        elif kind == "gpt2":
            p = f"transformer.h.{i}"
            out.update({f"{p}.attn.c_attn": (HIDDEN, 3 * HIDDEN), f"{p}.mlp.c_fc": (HIDDEN, 4 * HIDDEN)})
        elif kind == "bert":
            p = f"encoder.layer.{i}"
            out.update({f"{p}.attention.self.query": (HIDDEN, HIDDEN), f"{p}.output.dense": (64, HIDDEN)})
    if with_lm_head:
        out["lm_head"] = (HIDDEN, VOCAB)
    return out


def write_lora_adapter(folder: Path, base_dir: Path, kind: str, target_modules: list[str], r: int = 4,
                       seed: int = 2) -> Path:
    """A LoRA folder saved by real peft from the base at `base_dir`, with B non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(str(base_dir), attn_implementation="eager")
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, init_lora_weights=False,
                     fan_in_fan_out=kind == "gpt2")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(folder))
    return folder


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over the tiny vocabulary (`w0` .. `w94`, `[UNK]` = 95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------- hostile files

def deep_json(depth: int) -> str:
    """A JSON document nested `depth` levels deep (`[[[...]]]`)."""
    return "[" * depth + "]" * depth


def write_raw_safetensors(path: Path, header: dict | str | bytes, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (dict, JSON text or raw bytes) and data buffer.

    For headers the safetensors library would refuse to write (duplicate names, absurd
    shapes, nesting, unknown dtypes): the 8-byte length, the header, then `data`.
    """
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.write(data)
    return path


def write_lora_folder(folder: Path, shapes: dict[str, tuple[int, int]], r: int = 4, seed: int = 0,
                      config: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A LoRA folder (PEFT layout) for modules `{path: (in, out)}`; `config` overrides keys.

    `dtype` may be an integer or bool dtype (hostile: adapter weights must be floats).
    """
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_f, out_f) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) * 0.1).to(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.1).to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}), "task_type": "CAUSAL_LM"}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def write_tiny_onnx(folder: Path, inputs: tuple[str, ...] = ("input_ids", "attention_mask"),
                    vocab: int = VOCAB, external_location: str | None = None) -> Path:
    """A tiny ONNX "language model" (`logits = embedding[input_ids]`) in `folder/model.onnx`.

    Built with onnx.helper (no torch export): what `adapters run` needs to load a graph.
    `external_location` stores the embedding as external data at that (relative) path.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((vocab, vocab)).astype(np.float32),
                                  "embedding")
    nodes = [helper.make_node("Gather", ["embedding", inputs[0]], ["logits"], axis=0)]
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in inputs]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])
    model = helper.make_model(helper.make_graph(nodes, "tiny", graph_inputs, [out], [emb]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if external_location is not None:
        t = model.graph.initializer[0]
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        del t.external_data[:]
        for k, v in (("location", external_location), ("offset", "0"), ("length", str(vocab * vocab * 4))):
            e = t.external_data.add()
            e.key, e.value = k, v
    onnx.save(model, str(folder / "model.onnx"))
    return folder

# ----------------------------------------------------------------------------- Hugging Face cache

def write_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
                   refs: tuple[str, ...] = ("main",)) -> str:
    """Lay out `repo_id` in a Hugging Face cache as huggingface_hub does; returns the commit.

    `models--ORG--NAME/blobs/<id>` holds each file once (id: sha256 for LFS files, here
    `*.safetensors`; the git blob sha1 for the others), `snapshots/<commit>/<path>` are
    relative symlinks to the blobs, `refs/<branch>` holds the commit.
    """
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        if path.endswith(".safetensors"):
            blob_id = hashlib.sha256(data).hexdigest()
        else:
            blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob_id).write_bytes(data)
        link = snap / path
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / blob_id, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


BPE_VOCAB = 300  # 256 byte symbols + <|endoftext|> + merges


def write_bpe_tokenizer(folder: Path, vocab_size: int = BPE_VOCAB) -> Path:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few sentences; onnxruntime-genai reads it.

    Bases that carry it need `vocab_size=BPE_VOCAB`. `<|endoftext|>` (id 0) is bos/eos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "adapters merge into the base",
                             "a registry of low rank and high rank adapters"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def swap_key_and_value_presents(monkeypatch) -> None:
    """A cache bug for the generation checks: KV graphs return each layer's key and value swapped.

    Every prefill stays exact (the past is empty); only decoding through the cache shows it.
    """
    import exporters.onnx_graph as og_mod

    real_forward = og_mod.KVCacheWrapper.forward

    def swapped(self, input_ids, attention_mask, position_ids, past):
        logits, *present = real_forward(self, input_ids, attention_mask, position_ids, past)
        out = []
        for i in range(0, len(present), 2):
            out += [present[i + 1], present[i]]
        return (logits, *out)

    monkeypatch.setattr(og_mod.KVCacheWrapper, "forward", swapped)

    import exporters.onnx_export as export_mod

    real_write = export_mod.write_fused_decoder

    def write_swapped(model, spec, dtype, opset, path):  # the fused writer: swap the graph's present outputs
        import onnx

        opset = real_write(model, spec, dtype, opset, path)
        proto = onnx.load(str(path), load_external_data=False)
        by_output = {n.output[0]: n for n in proto.graph.node if n.op_type == "Identity"}
        for i in range(spec.layers):
            key, value = by_output[f"present.{i}.key"], by_output[f"present.{i}.value"]
            key.input[0], value.input[0] = value.input[0], key.input[0]
        onnx.save(proto, str(path))
        return opset

    monkeypatch.setattr(export_mod, "write_fused_decoder", write_swapped)
