"""KV-cache decoder graphs of Llama, Mistral and Qwen2 written directly, with ONNX Runtime's fused ops.

Why: the traced graph (`exporters.onnx_graph`, torch's dynamo exporter) spells attention
out in ~60 small ops per layer: the 4D mask rebuilt from `attention_mask` inside the
graph, `repeat_kv` `Expand`s that copy the whole past every step, rotary tables
recomputed, Transpose/Concat chains. onnxruntime-genai's model builder writes a fused
graph instead, but its `GroupQueryAttention` takes `seqlens_k = sum(mask) - 1` and treats
keys `[0, seqlens_k]` of each row as the valid ones (right padding, the layout genai
batches with), so a left-padded batch attends to its padding and misses its last tokens
(our generation check: max abs 3.9 on logits). This module writes the same kind of fused
graph, but keeps the Optimum contract exactly (left padding, `attention_mask`,
`position_ids`, past/present `[batch, kv_heads, past, head_size]`):

- the mask is computed **once per step** for all layers, as an additive bias
  `[batch, 1, sequence, total]` (key allowed by `attention_mask`, causal on absolute cache
  indices, and the sliding window where the layer has one, as transformers' masks do);
- attention is one `com.microsoft.GroupQueryAttention` per layer fed that bias, with
  `seqlens_k = total - 1` for every row (all rows "full", so the op's right-padding
  notion never masks anything) and its own rotary off;
- rotary is `com.microsoft.RotaryEmbedding` on the 3D projections with `position_ids`
  and cos/sin tables precomputed in float32 exactly as transformers computes them
  (`inv_freq` and `attention_scaling` taken from the built model's rotary module);
- RMSNorm is fused with the residual add as `com.microsoft.SkipSimplifiedLayerNormalization`
  (the first one, with no residual yet, is spelled out in ONNX ops); q/k/v are one packed
  `MatMul` split three ways, gate/up another (fewer kernel calls per decode step: 4 MatMuls
  per layer instead of 7); no Transpose anywhere.

The weights come from the built (merged) model by parameter name and are streamed into
the external data file one tensor at a time (`path.name + ".data"`), each linear weight
transposed once for `MatMul`; no trace, no second copy of the model.

Contract: `write_fused_decoder(model, spec, dtype, opset, path)` leaves a checked graph
with exactly the signature of `onnx_graph.kv_spec(config)` (names, dtypes, symbolic
axes); the caller validates it as any other KV graph. `fused_refusal(config)` says why an
architecture/config is not written here (the caller then uses the torch exporter).
Limitation (ONNX Runtime's GroupQueryAttention): a call with a non-empty past and more
than one new token must have batch 1 (prefill with an empty past and one-token decode
steps, which is how generation runs, work at any batch).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from exporters.onnx_graph import ONNX_DTYPES, GraphSpec
from exporters.onnx_layout import PAST_KEY, PAST_VALUE

FUSED_TYPES = ("llama", "mistral", "qwen2")
# rotary variants whose tables do not depend on the sequence length (precomputable)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
DEFAULT_OPSET = 20  # the same default-domain opset torch 2.13's exporter writes
EXPORTER = "exporters.fused_decoder (onnx.helper; GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization)"


def fused_refusal(config) -> str | None:
    """None when `config` is written by this module; otherwise why not (one phrase)."""
    if config.model_type not in FUSED_TYPES:
        return f"{config.model_type} is not one of {', '.join(FUSED_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    rope = dict(getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {})
    if any(isinstance(v, dict) for v in rope.values()):
        return "rotary parameters per layer type"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in STATIC_ROPE:
        return f"rope type {kind!r} (tables depend on the sequence length)"
    if float(rope.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "partial rotary"
    heads, kv_heads = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or 0)
    if kv_heads and heads % kv_heads:
        return f"{heads} heads not a multiple of {kv_heads} kv heads"
    return None


def _window(config, layer: int) -> int | None:
    """The sliding window of `layer` as transformers' masks apply it (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return int(window) if types[layer] == "sliding_attention" and window else None
    return int(window) if config.model_type == "mistral" and window else None


class _Writer:
    """Nodes, value names and external-data initializers of the graph being written."""

    def __init__(self, data_path: Path):
        self.nodes: list = []
        self.inits: list = []
        self.data_path = data_path
        self.data = open(data_path, "wb")
        self.offset = 0
        self.count = 0

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
             **attrs) -> list[str]:
        from onnx import helper

        self.count += 1
        base = name or f"/{op}_{self.count}"
        outs = [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=base, domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **kw) -> str:
        return self.node(op, inputs, 1, **kw)[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer whose bytes go to the external data file now (64-byte aligned)."""
        import onnx
        from onnx import helper

        array = np.ascontiguousarray(array)
        pad = -self.offset % 64
        if pad:
            self.data.write(b"\0" * pad)
            self.offset += pad
        self.data.write(memoryview(array).cast("B"))
        t = onnx.TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += array.nbytes
        self.inits.append(t)
        return name

    def const(self, name: str, value, dtype=np.int64) -> str:
        from onnx import numpy_helper

        if not any(t.name == name for t in self.inits):
            self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _rotary_tables(model: torch.nn.Module, positions: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `[positions, head_size/2]` as transformers' rotary module computes them (float32, then cast)."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.to(torch.float32)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return _np(freqs.cos() * scaling, dtype), _np(freqs.sin() * scaling, dtype)


def _seqlens_k(w: _Writer, total32: str, batch: str) -> str:
    """GroupQueryAttention's `seqlens_k`: `total - 1` for every row.

    The op treats keys `[0, seqlens_k]` of a row as valid; with every row "full" it masks
    nothing itself, and the padding (wherever it is) is masked by the bias. The model
    builder's `sum(attention_mask) - 1` is right only for right-padded rows.
    """
    last = w.one("Sub", [total32, w.const("/c/1i32", 1, np.int32)], name="/mask/last")
    return w.one("Expand", [last, batch], name="/mask/seqlens_k")


def _rms_norm(w: _Writer, x: str, gamma: str, eps: float, name: str, io: int) -> str:
    """transformers' RMSNorm: in float32, `x * rsqrt(mean(x^2) + eps)`, cast back, times the weight."""
    from onnx import TensorProto

    xf = x if io == TensorProto.FLOAT else w.one("Cast", [x], name=f"/{name}/to_float", to=TensorProto.FLOAT)
    var = w.one("ReduceMean", [w.one("Mul", [xf, xf], name=f"/{name}/square"), w.const("/c/axes-1", [-1])],
                name=f"/{name}/mean", keepdims=1)
    inv = w.one("Reciprocal", [w.one("Sqrt", [w.one("Add", [var, w.const(f"/c/eps{eps}", eps, np.float32)],
                                                    name=f"/{name}/add_eps")], name=f"/{name}/sqrt")],
                name=f"/{name}/rsqrt")
    y = w.one("Mul", [xf, inv], name=f"/{name}/scale")
    if io != TensorProto.FLOAT:
        y = w.one("Cast", [y], name=f"/{name}/to_io", to=io)
    return w.one("Mul", [y, gamma], name=f"/{name}/weight")


def write_fused_decoder(model: torch.nn.Module, spec: GraphSpec, dtype: str, opset: int | None, path: Path) -> int:
    """Write the fused KV-cache graph of `model` (Llama/Mistral/Qwen2) at `path`; returns its opset.

    Weights in `path.name + ".data"`; the graph is checked with `onnx.checker`.
    """
    import onnx
    from onnx import TensorProto, helper

    from exporters.hf_model import max_positions

    config = model.config
    want = ONNX_DTYPES[dtype]
    io = helper.np_dtype_to_tensor_dtype(np.dtype(np.float16 if want == torch.float16 else np.float32))
    np_dtype = np.float16 if want == torch.float16 else np.float32
    layers, kv_heads, head = spec.layers, spec.kv_heads, spec.head_size
    heads = int(config.num_attention_heads)
    eps = float(config.rms_norm_eps)
    state = dict(model.named_parameters(remove_duplicate=False))
    w = _Writer(path.with_name(path.name + ".data"))
    try:
        def param(name: str) -> torch.Tensor:
            return state[name]

        def linear(x: str, prefix: str) -> str:
            return packed(x, [prefix])[0]

        def packed(x: str, prefixes: list[str]) -> list[str]:
            """One MatMul (+ Add) for projections reading the same input, split back per projection."""
            name = prefixes[0] if len(prefixes) == 1 else f"{prefixes[0]}+{len(prefixes) - 1}"
            weight = torch.cat([param(f"{p}.weight") for p in prefixes]).t() if len(prefixes) > 1 \
                else param(f"{prefixes[0]}.weight").t()
            y = w.one("MatMul", [x, w.weight(f"{name}.weight.T", _np(weight, want))], name=f"/{name}/MatMul")
            del weight
            if any(f"{p}.bias" in state for p in prefixes):
                bias = torch.cat([state[f"{p}.bias"] if f"{p}.bias" in state
                                  else torch.zeros(param(f"{p}.weight").shape[0]) for p in prefixes])
                y = w.one("Add", [y, w.weight(f"{name}.bias", _np(bias, want))], name=f"/{name}/Add")
            if len(prefixes) == 1:
                return [y]
            sizes = [int(param(f"{p}.weight").shape[0]) for p in prefixes]
            return w.node("Split", [y, w.const(f"/c/split{sizes}", sizes)], len(prefixes), name=f"/{name}/Split",
                          axis=-1)

        # ---- once per step: the attention bias and GroupQueryAttention's lengths
        shape_ids = w.one("Shape", ["input_ids"], name="/mask/ids_shape")
        shape_mask = w.one("Shape", ["attention_mask"], name="/mask/mask_shape")
        one = w.const("/c/1", [1])
        seq = w.one("Gather", [shape_ids, one], name="/mask/sequence")  # [1]
        total = w.one("Gather", [shape_mask, one], name="/mask/total")  # [1]
        batch = w.one("Gather", [shape_ids, w.const("/c/0", [0])], name="/mask/batch")
        past = w.one("Sub", [total, seq], name="/mask/past")
        scalar = w.const("/c/axes0", [0])
        q_idx = w.one("Range", [w.one("Squeeze", [past, scalar], name="/mask/past_s"),
                                w.one("Squeeze", [total, scalar], name="/mask/total_s"), w.const("/c/1s", 1)],
                      name="/mask/q_idx")
        k_idx = w.one("Range", [w.const("/c/0s", 0), w.one("Squeeze", [total, scalar], name="/mask/total_s2"),
                                w.const("/c/1s", 1)], name="/mask/k_idx")
        q_col = w.one("Unsqueeze", [q_idx, w.const("/c/axes1", [1])], name="/mask/q_col")  # [S, 1]
        causal = w.one("LessOrEqual", [k_idx, q_col], name="/mask/causal")  # [S, T]
        key_ok = w.one("Cast", [w.one("Unsqueeze", ["attention_mask", w.const("/c/axes12", [1, 2])],
                                      name="/mask/key_ok4")], name="/mask/key_ok", to=TensorProto.BOOL)
        zero_b = w.const("/c/zero_bias", 0.0, np_dtype)
        low = w.const("/c/min_bias", np.finfo(np_dtype).min, np_dtype)
        biases: dict[int | None, str] = {}

        def bias_for(window: int | None) -> str:
            if window not in biases:
                allowed = causal
                if window is not None:  # transformers: kv_idx > q_idx - window
                    lo = w.one("Sub", [q_col, w.const(f"/c/window{window}", window)], name=f"/mask/lo{window}")
                    allowed = w.one("And", [causal, w.one("Greater", [k_idx, lo], name=f"/mask/band{window}")],
                                    name=f"/mask/causal{window}")
                allowed = w.one("And", [key_ok, allowed], name=f"/mask/allowed{window or ''}")  # [B, 1, S, T]
                biases[window] = w.one("Where", [allowed, zero_b, low], name=f"/mask/bias{window or ''}")
            return biases[window]

        total32 = w.one("Cast", [w.one("Squeeze", [total, scalar], name="/mask/total_s3")],
                        name="/mask/total_sequence_length", to=TensorProto.INT32)
        seqlens = _seqlens_k(w, total32, batch)

        cos, sin = _rotary_tables(model, max_positions(config), want)
        cos = w.weight("/rotary/cos_cache", cos)
        sin = w.weight("/rotary/sin_cache", sin)

        # ---- layers
        x = w.one("Gather", [w.weight("model.embed_tokens.weight", _np(param("model.embed_tokens.weight"), want)),
                             "input_ids"], name="/model/embed_tokens")
        residual = x
        pending: str | None = None  # the sublayer output not yet added to the residual
        presents: list[str] = []

        def norm(name: str) -> str:
            nonlocal residual, pending
            gamma = w.weight(name, _np(param(name), want))
            if pending is None:  # the first norm: plain ONNX ops (SimplifiedLayerNormalization is no ONNX op)
                return _rms_norm(w, residual, gamma, eps, name, io)
            out = w.node("SkipSimplifiedLayerNormalization", [pending, residual, gamma], 4, domain="com.microsoft",
                         name=f"/{name}/skip_norm", epsilon=eps)
            out[1] = out[2] = ""  # mean and inverse std are not needed
            w.nodes[-1].output[1] = w.nodes[-1].output[2] = ""
            residual, pending = out[3], None
            return out[0]

        for i in range(layers):
            p = f"model.layers.{i}"
            h = norm(f"{p}.input_layernorm.weight")
            q, k, v = packed(h, [f"{p}.self_attn.{n}_proj" for n in "qkv"])
            q = w.one("RotaryEmbedding", [q, "position_ids", cos, sin], domain="com.microsoft",
                      name=f"/{p}/rotary_q", num_heads=heads, interleaved=0)
            k = w.one("RotaryEmbedding", [k, "position_ids", cos, sin], domain="com.microsoft",
                      name=f"/{p}/rotary_k", num_heads=kv_heads, interleaved=0)
            attn = w.node("GroupQueryAttention", [q, k, v, PAST_KEY % i, PAST_VALUE % i, seqlens, total32,
                                                  "", "", "", bias_for(_window(config, i))], 3,
                          domain="com.microsoft", name=f"/{p}/attention", num_heads=heads, kv_num_heads=kv_heads,
                          scale=1.0 / math.sqrt(head), do_rotary=0)
            presents += [attn[1], attn[2]]
            pending = linear(attn[0], f"{p}.self_attn.o_proj")
            h = norm(f"{p}.post_attention_layernorm.weight")
            gate, up = packed(h, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
            act = w.one("Mul", [gate, w.one("Sigmoid", [gate], name=f"/{p}/mlp/sigmoid")], name=f"/{p}/mlp/silu")
            pending = linear(w.one("Mul", [act, up], name=f"/{p}/mlp/gated"), f"{p}.mlp.down_proj")
        h = norm("model.norm.weight")
        logits = w.one("MatMul", [h, w.weight("lm_head.weight.T", _np(param("lm_head.weight").t(), want))],
                       name="/lm_head/MatMul")
    finally:
        w.data.close()

    # ---- the signature (names and symbolic axes of onnx_graph.kv_spec)
    for src, name in zip([logits, *presents], spec.output_names):
        w.nodes.append(helper.make_node("Identity", [src], [name], name=f"/output/{name}"))
    vocab = int(config.vocab_size)
    past_shape = ["batch", kv_heads, "past_sequence", head]
    present_shape = ["batch", kv_heads, "past_sequence + sequence", head]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    inputs += [helper.make_tensor_value_info(n, io, past_shape) for n in spec.input_names[3:]]
    outputs = [helper.make_tensor_value_info("logits", io, ["batch", "sequence", vocab])]
    outputs += [helper.make_tensor_value_info(n, io, present_shape) for n in spec.output_names[1:]]
    # the ops' own output names carry the step's shapes; initializers first so checkers see constants
    graph = helper.make_graph(w.nodes, "decoder", inputs, outputs, initializer=w.inits)
    real_opset = opset or DEFAULT_OPSET
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", real_opset),
                                                          helper.make_opsetid("com.microsoft", 1)],
                                    producer_name="adapter-registry", ir_version=10)
    onnx.save(model_proto, str(path))
    onnx.checker.check_model(str(path))
    return real_opset
