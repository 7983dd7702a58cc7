"""Footprints: the rectangles of a weight an op's `add_into` reads and writes. MoRA type 6
declares its diagonal blocks (wrapped columns, ragged and repeated row blocks, Conv1D's
transposed layout), and the streaming merge then widens only those to float32: its output
must be the very bytes of the full path (widen everything, add, round once)."""

from __future__ import annotations

import pytest
import torch

from exporters.safetensors_out import merge_folder
from mora_core.adapter import load_adapter
from mora_core.merge import merge_tensor
from mora_core.mora import MORA_TYPES, MoraOperator, mora_rank
from mora_core.ops import MoraOp
from tests.builders import (
    llama_like,
    mora_shapes,
    read_folder,
    write_mora_adapter,
    write_tensor_base,
)

SENTINEL = 1e30  # no update of these tests comes near it; reading it would show in the result

# (in, out, r_hat): square; out a few periods of n_blocks * r_hat with a ragged end; in not a
# multiple of r_hat (wrapped last block); in < r_hat (positions wrap several times); out < r_hat
SHAPES = [(48, 48, 12), (48, 200, 14), (80, 48, 14), (10, 37, 16), (37, 5, 8), (64, 64, 64)]


def _mask(shape: tuple[int, int], rects: list[tuple[slice, slice]]) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for rows, cols in rects:
        m[rows, cols] = True
    return m


@pytest.mark.parametrize("in_f,out_f,r_hat", SHAPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_type6_reads_and_writes_only_its_footprint(in_f, out_f, r_hat, fan_in_fan_out):
    g = torch.Generator().manual_seed(in_f * 1000 + out_f)
    op = MoraOp("w", (in_f, out_f) if fan_in_fan_out else (out_f, in_f), "a",
                torch.randn(r_hat, r_hat, generator=g), MoraOperator(in_f, out_f, r_hat, 6), fan_in_fan_out)
    base = torch.randn(op.shape, generator=g)
    full = base.clone()
    op.add_into(full, 0.7, base)
    inside = _mask(op.shape, op.footprint())
    assert torch.equal(full[~inside], base[~inside])  # nothing outside is changed...
    assert not torch.equal(full[inside], base[inside])
    part = torch.full(op.shape, SENTINEL)
    part[inside] = base[inside]
    op.add_into(part, 0.7, base)
    assert torch.equal(part[inside], full[inside])  # ...nor read: the sentinel did not leak in
    assert bool((part[~inside] == SENTINEL).all())


@pytest.mark.parametrize("mora_type", [t for t in MORA_TYPES if t != 6])
def test_other_types_touch_the_whole_tensor(mora_type):
    assert MoraOperator(48, 80, mora_rank(48, 80, 8, mora_type), mora_type).footprint() is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_streamed_type6_merge_is_the_full_path_byte_for_byte(tmp_path, dtype):
    base = llama_like(dtype=dtype)
    write_tensor_base(tmp_path / "base", base, shards=2)
    write_mora_adapter(tmp_path / "a", mora_shapes(), mora_type=6, scale=0.05)
    write_mora_adapter(tmp_path / "b", mora_shapes(), mora_type=6, r=4, seed=1, scale=0.05)
    adapters = [load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b")]
    report = merge_folder(tmp_path / "base", adapters, tmp_path / "out", weights=[0.5, 1.5])
    got = read_folder(tmp_path / "out")
    from mora_core.plan import build_plan

    plan = build_plan({k: tuple(v.shape) for k, v in base.items()}, adapters, [0.5, 1.5])
    assert plan.ops and all(op.footprint() is not None for ops in plan.ops.values() for op, _ in ops)
    for name, ops in plan.ops.items():
        want = merge_tensor(base[name], ops, name=name)  # widen all, add, round once
        assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
    deltas = [(merge_tensor(base[n], ops, out_dtype=torch.float32, name=n) - base[n].float()).abs().max().item()
              for n, ops in plan.ops.items()]
    assert report.to_dict()["max_abs_delta"] == pytest.approx(max(deltas), rel=1e-6)
