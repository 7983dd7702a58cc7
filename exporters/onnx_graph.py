"""Graph export: a PyTorch module with merged weights -> an ONNX file with the serving signature.

One function, `export_graph`, is the boundary the rest of the exporter uses: it takes a
built model (whatever way its weights got there), a `GraphSpec` (which signature to
give the graph) and a path, and leaves a checked `.onnx` (+ external data) at that path.
It knows nothing of adapters, merging or validation.

Two signatures:

- plain (`plain_spec`): `input_ids, attention_mask -> logits | last_hidden_state`, no
  cache; encoders (BERT also takes `token_type_ids`, as its tokenizer returns them), and
  decoders exported with `--no-kv-cache`;
- KV cache (`kv_spec`, decoders' default): `input_ids [batch, sequence]`,
  `attention_mask [batch, past_sequence + sequence]`, `position_ids [batch, sequence]`,
  `past_key_values.{i}.key|value [batch, kv_heads, past_sequence, head_size]` ->
  `logits`, `present.{i}.key|value` (the names Optimum and onnxruntime-genai use). One
  graph serves prefill (`past_sequence` = 0) and decode. The cache crosses the graph
  boundary as plain tensors: the wrapper builds transformers' `DynamicCache` from them
  inside `forward` and returns its layers, so no cache class has to be a pytree the
  exporter knows (torch 2.13 + transformers 5 export this without any registration).

Exporter path: `torch.onnx.export(dynamo=True, optimize=True)` with `torch.export.Dim`
dynamic shapes. The TorchScript exporter (`dynamo=False`) was tried first and rejected:
its traces of GPT-2 and BERT bake the example's sequence length into the attention-mask
arithmetic, so the graph loads with symbolic axes yet returns wrong values at other
lengths (max diff 0.26 on GPT-2 logits, 3.2 on BERT hidden states at seq 33 vs the
traced 7). The dynamo exporter gave ~1e-7 on Llama, GPT-2 and BERT at every tested
shape, and `optimize=True` (onnxscript's optimizer: constant folding, dead code) keeps
that while producing a smaller graph to serve.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters.errors import ExportError
from exporters.hf_model import OUTPUT_NAME, cache_dims, max_positions
from exporters.onnx_layout import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

ONNX_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# torch's dynamo exporter emits opset 18+; asking for less converts down, and at 17 that
# conversion produced graphs ONNX Runtime rejects (Split), at 14 it silently kept 18
MIN_OPSET, MAX_OPSET = 18, 23




@dataclass(frozen=True)
class GraphSpec:
    """The signature of the graph to write: names of its inputs and outputs."""

    task: str  # "causal-lm" | "encoder"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    kv_cache: bool = False
    layers: int = 0  # cache layers (kv_cache only)
    kv_heads: int = 0
    head_size: int = 0

    def describe(self) -> dict:
        """Inputs and outputs with their symbolic shapes, for export.json."""
        shapes = {"input_ids": ["batch", "sequence"], "position_ids": ["batch", "sequence"],
                  "token_type_ids": ["batch", "sequence"],
                  "attention_mask": ["batch", "past_sequence + sequence" if self.kv_cache else "sequence"]}
        last = "vocab" if self.task == "causal-lm" else "hidden"
        out = {"inputs": {}, "outputs": {}}
        for n in self.input_names:
            out["inputs"][n] = shapes.get(n, ["batch", self.kv_heads, "past_sequence", self.head_size])
        for n in self.output_names:
            out["outputs"][n] = (["batch", "sequence", last] if n == OUTPUT_NAME[self.task]
                                 else ["batch", self.kv_heads, "past_sequence + sequence", self.head_size])
        return out


def plain_spec(task: str, config=None) -> GraphSpec:
    """`(input_ids, attention_mask[, token_type_ids]) -> logits | last_hidden_state`, no cache.

    Encoders whose config has segment embeddings (`type_vocab_size > 1`, BERT) take
    `token_type_ids` too.
    """
    names: tuple[str, ...] = ("input_ids", "attention_mask")
    if task == "encoder" and int(getattr(config, "type_vocab_size", 0) or 0) > 1:
        names += ("token_type_ids",)
    return GraphSpec(task, names, (OUTPUT_NAME[task],))


def kv_spec(config) -> GraphSpec:
    """The KV-cache decoder signature for `config` (see the module docstring)."""
    layers, kv_heads, head_size = cache_dims(config)
    past = [n % i for i in range(layers) for n in (PAST_KEY, PAST_VALUE)]
    present = [n % i for i in range(layers) for n in (PRESENT_KEY, PRESENT_VALUE)]
    return GraphSpec("causal-lm", ("input_ids", "attention_mask", "position_ids", *past), ("logits", *present),
                     kv_cache=True, layers=layers, kv_heads=kv_heads, head_size=head_size)


class PlainWrapper(torch.nn.Module):
    """`(input_ids, attention_mask[, token_type_ids]) -> logits | last_hidden_state`: the no-cache signature."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)
        return out.logits if self.task == "causal-lm" else out.last_hidden_state


class KVCacheWrapper(torch.nn.Module):
    """`(input_ids, attention_mask, position_ids, past) -> (logits, *present)`.

    `past` is a list of (key, value) per layer, [batch, kv_heads, past, head_size]; the
    outputs' presents are the past with this call's keys/values appended.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _kv_example(model: torch.nn.Module, spec: GraphSpec, dtype: torch.dtype) -> tuple[tuple, dict]:
    # past 4, sequence 3: sizes above 1 so the exporter does not specialise them (0 and 1
    # would be baked in); `past_sequence` is declared from 0 so that prefill runs too
    batch, seq, past = 2, 3, 4
    shape = (batch, spec.kv_heads, past, spec.head_size)
    example = (torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past + seq, dtype=torch.long),
               torch.arange(past, past + seq).expand(batch, seq).contiguous(),
               [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(spec.layers)])
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    p, t = torch.export.Dim("past_sequence", min=0), torch.export.Dim("total_sequence")
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
               "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(spec.layers)]}
    return example, dynamic


def _plain_example(model: torch.nn.Module, spec: GraphSpec | None = None) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Example inputs and dynamic axes of the plain signature (`spec` None: ids and mask)."""
    names = spec.input_names if spec is not None else ("input_ids", "attention_mask")
    seq = min(8, max_positions(model.config))
    example = tuple(torch.ones(2, seq, dtype=torch.long) for _ in names)
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {n: {0: batch_dim, 1: seq_dim} for n in names}
    return example, dynamic


def export_graph(model: torch.nn.Module, spec: GraphSpec, dtype: str, opset: int | None, path: Path,
                 external: bool) -> int:
    """Export `model` (eval) with the signature `spec` in `dtype`; returns the graph's opset.

    A model already in `dtype` is exported as it is; any other is cast on a copy.

    The graph is saved at `path` (weights in `path.name + ".data"` when `external`) and
    checked with `onnx.checker`. A failure of the exporter is an `ExportError` naming
    the architecture.
    """
    want = ONNX_DTYPES[dtype]
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    export_model = model if all(d == want for d in floating) else copy.deepcopy(model).to(want)
    if spec.kv_cache:
        wrapper: torch.nn.Module = KVCacheWrapper(export_model).eval()
        example, dynamic = _kv_example(model, spec, want)
    else:
        wrapper = PlainWrapper(export_model, spec.task).eval()
        example, dynamic = _plain_example(model, spec)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return export_module(wrapper, example, dynamic, spec.input_names, spec.output_names, opset, path, external,
                         model_type)


def export_module(wrapper: torch.nn.Module, example: tuple, dynamic: dict, input_names: Sequence[str],
                  output_names: Sequence[str], opset: int | None, path: Path, external: bool,
                  model_type: str) -> int:
    """`torch.onnx.export(dynamo=True, optimize=True)` of a ready wrapper, quietly; saved and checked.

    The one place the exporter is called (merged and slot graphs alike); a failure is an
    `ExportError` naming `model_type`. Returns the graph's opset.
    """
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, example, None, input_names=list(input_names), output_names=list(output_names),
                opset_version=opset, dynamo=True, dynamic_shapes=dynamic, optimize=True, verbose=False)
            program.save(str(path), external_data=external)
        import onnx

        onnx.checker.check_model(str(path))  # by path: works past the 2 GB protobuf limit
    except ExportError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"architecture {model_type}: torch.onnx.export failed "
                          f"({type(exc).__name__}: {first})") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return graph_opset(path)


def graph_opset(path: Path) -> int:
    """The default-domain opset the graph at `path` declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
