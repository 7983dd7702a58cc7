"""int4 weights for CPU serving: MatMulNBits, block size 32, as onnxruntime-genai's builder makes them.

Every `MatMul` whose second input is a constant 2-D weight becomes a `com.microsoft`
`MatMulNBits` node: 4-bit symmetric weights in blocks of 32 along the input dimension,
one float32 scale per block, `accuracy_level` 4 (int8 activations in the CPU kernel).
These are the defaults of onnxruntime-genai's model builder for CPU int4
(`int4_block_size=32`, `int4_is_symmetric`, `int4_accuracy_level=4`), produced with
onnxruntime's own `MatMulNBitsQuantizer`. GPT-2's Conv1D layers export as `Gemm`, which
that quantiser skips; a plain `Gemm(x, W, b)` (no transposes, alpha = beta = 1) is first
rewritten as `MatMul(x, W) + b`, the same arithmetic, so they are quantised too.
Embedding lookups (`Gather`) and everything else stay float32.

The quantised graph is proven against the float32 references like any export, with the
int4 tolerance of `exporters.validate` (derived from measurements, see there).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4
INT4_SYMMETRIC = True


def quantize_int4(src: Path, dst: Path, external: bool) -> dict[str, Any]:
    """Write `dst`: the float32 graph at `src` with its constant-weight MatMuls in int4.

    `external`: the weights go to `dst.name + ".data"`. Returns what was quantised
    (`nodes`, `block_size`, `accuracy_level`, `symmetric`).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    _gemms_as_matmuls(model)
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=INT4_SYMMETRIC,
                                          accuracy_level=INT4_ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=INT4_SYMMETRIC,
                                     accuracy_level=INT4_ACCURACY_LEVEL, algo_config=config)
    del model
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        quantizer.process()
    finally:
        log.setLevel(level)
    out = quantizer.model.model
    nodes = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    if external:
        onnx.save_model(out, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(out, str(dst))
    return {"nodes": nodes, "bits": 4, "block_size": INT4_BLOCK_SIZE, "accuracy_level": INT4_ACCURACY_LEVEL,
            "symmetric": INT4_SYMMETRIC, "format": "com.microsoft MatMulNBits"}


def _gemms_as_matmuls(model) -> int:
    """Rewrite each `Gemm(x, W, b)` with a constant W and no transpose/scaling as MatMul + Add."""
    import onnx

    constants = {t.name for t in model.graph.initializer}
    nodes = []
    changed = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = (attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 0 and attrs.get("alpha", 1.0) == 1.0
                 and attrs.get("beta", 1.0) == 1.0)
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not plain \
                or len(node.input) < 2 or node.input[1] not in constants:
            nodes.append(node)
            continue
        if len(node.input) < 3 or not node.input[2]:
            nodes.append(onnx.helper.make_node("MatMul", node.input[:2], node.output, name=node.name))
        else:
            product = f"{node.output[0]}_matmul"
            nodes.append(onnx.helper.make_node("MatMul", node.input[:2], [product], name=f"{node.name}_matmul"))
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], node.output, name=node.name))
        changed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return changed
