"""Graph export: a PyTorch module with merged weights -> an ONNX file with the serving signature.

One function, `export_graph`, is the boundary the rest of the exporter uses: it takes a
built model (whatever way its weights got there), a `GraphSpec` (which signature to
give the graph) and a path, and leaves a checked `.onnx` (+ external data) at that path.
It knows nothing of adapters, merging or validation.

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
from exporters.hf_model import OUTPUT_NAME, max_positions

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


def plain_spec(task: str) -> GraphSpec:
    """`(input_ids, attention_mask) -> logits | last_hidden_state`, no cache."""
    return GraphSpec(task, ("input_ids", "attention_mask"), (OUTPUT_NAME[task],))


class PlainWrapper(torch.nn.Module):
    """`(input_ids, attention_mask) -> logits | last_hidden_state`: the no-cache signature."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.logits if self.task == "causal-lm" else out.last_hidden_state


def _plain_example(model: torch.nn.Module) -> tuple[tuple[torch.Tensor, ...], dict]:
    seq = min(8, max_positions(model.config))
    example = (torch.ones(2, seq, dtype=torch.long), torch.ones(2, seq, dtype=torch.long))
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"input_ids": {0: batch_dim, 1: seq_dim}, "attention_mask": {0: batch_dim, 1: seq_dim}}
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
    wrapper = PlainWrapper(export_model, spec.task).eval()
    example, dynamic = _plain_example(model)
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
