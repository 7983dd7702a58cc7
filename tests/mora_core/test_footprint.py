"""Footprints: the regions of a weight an op's `add_into` reads and writes. MoRA type 6
declares its diagonal blocks (one strided region per period for the whole blocks; wrapped
columns, ragged and repeated row blocks as column runs; Conv1D's transposed layout), and the
streaming merge then widens only those to float32: its output must be the very bytes of the
full path (widen everything, add, round once)."""

from __future__ import annotations

import pytest
import torch

from exporters.safetensors_out import merge_folder
from mora_core.adapter import load_adapter
from mora_core.errors import MergeError
from mora_core.merge import footprint, merge_tensor
from mora_core.mora import MORA_TYPES, MoraOperator, mora_rank
from mora_core.ops import LoraOp, MoraOp
from mora_core.region import Region, disjoint
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


def _mask(shape: tuple[int, int], regions) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for region in regions:
        region.view(m).fill_(True)
    return m


def _type6(in_f: int, out_f: int, r_hat: int, fan_in_fan_out: bool) -> MoraOp:
    g = torch.Generator().manual_seed(in_f * 1000 + out_f)
    return MoraOp("w", (in_f, out_f) if fan_in_fan_out else (out_f, in_f), "a",
                  torch.randn(r_hat, r_hat, generator=g), MoraOperator(in_f, out_f, r_hat, 6), fan_in_fan_out)


def _changed(op: MoraOp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, base + 0.7 dW, mask of the elements add_into changed)."""
    base = torch.randn(op.shape, generator=torch.Generator().manual_seed(7))
    full = base.clone()
    op.add_into(full, 0.7, base)
    return base, full, full != base


@pytest.mark.parametrize("in_f,out_f,r_hat", SHAPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_type6_reads_and_writes_only_its_footprint(in_f, out_f, r_hat, fan_in_fan_out):
    op = _type6(in_f, out_f, r_hat, fan_in_fan_out)
    base, full, changed = _changed(op)
    inside = _mask(op.shape, op.footprint())
    assert torch.equal(inside, changed)  # the regions are exactly the elements add_into changes
    part = torch.full(op.shape, SENTINEL)
    part[inside] = base[inside]
    op.add_into(part, 0.7, base)
    assert torch.equal(part[inside], full[inside])  # ...and all it reads: the sentinel did not leak in
    assert bool((part[~inside] == SENTINEL).all())


@pytest.mark.parametrize("in_f,out_f,r_hat", SHAPES)
def test_type6_footprint_is_few_regions(in_f, out_f, r_hat):
    """Whole diagonal blocks of a period are one strided region and a run recurring in every
    period is one region: at most one diagonal per period plus the runs of two blocks
    (the wrapped one and the ragged one) per period, and never more than the blocks."""
    op = MoraOperator(in_f, out_f, r_hat, 6)
    regions = op.footprint()
    periods = -(-out_f // (op.n_blocks * r_hat))
    runs_per_block = -(-r_hat // in_f) + 1  # column runs of one block
    assert len(regions) <= periods * (1 + 2 * runs_per_block)


def test_bench_shapes_take_a_few_regions_each():
    """The merge bench's Llama-like shapes (hidden 2048, intermediate 5504, r=8): 3, 6 and 2
    regions (13, 25 and 9 rectangles, one per block and column run, before)."""
    counts = [len(MoraOperator(i, o, mora_rank(i, o, 8, 6), 6).footprint())
              for o, i in [(2048, 2048), (5504, 2048), (2048, 5504)]]
    assert counts == [3, 6, 2]


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_wrong_region_stride_is_caught(fan_in_fan_out):
    """The coverage check above can fail: the diagonal region with its step off by one column
    (or its transposed form for Conv1D) no longer matches what add_into changes."""
    op = _type6(48, 200, 14, fan_in_fan_out)
    _, _, changed = _changed(op)
    regions = list(op.footprint())
    i = next(k for k, region in enumerate(regions) if region.count > 1 and region.step[0] == region.step[1])
    bad = regions[i]
    regions[i] = Region(bad.row, bad.col, bad.rows, bad.cols, bad.count, (bad.step[0], bad.step[1] + 1))
    assert torch.equal(_mask(op.shape, op.footprint()), changed)
    assert not torch.equal(_mask(op.shape, regions), changed)


def test_region_views_write_through_and_stay_inside():
    t = torch.arange(6 * 8).reshape(6, 8)
    region = Region(1, 2, 2, 3, count=2, step=(3, 1))
    assert region.view(t).tolist() == [[[10, 11, 12], [18, 19, 20]], [[35, 36, 37], [43, 44, 45]]]
    assert torch.equal(region.transposed().view(t.T), region.view(t).transpose(1, 2))
    region.view(t).zero_()
    assert int((t == 0).sum()) == 12 + 1  # the 12 elements and the original 0
    with pytest.raises(ValueError, match="does not fit"):
        Region(1, 2, 2, 3, count=3, step=(3, 1)).view(t)  # third copy: rows 7..8 of 6
    with pytest.raises(ValueError, match="does not fit"):
        Region(0, 6, 1, 3).view(t)
    with pytest.raises(ValueError, match="negative"):
        Region(0, -1, 1, 1)


@pytest.mark.parametrize("mora_type", [t for t in MORA_TYPES if t != 6])
def test_other_types_touch_the_whole_tensor(mora_type):
    assert MoraOperator(48, 80, mora_rank(48, 80, 8, mora_type), mora_type).footprint() is None


def test_disjoint_regions():
    a = Region(0, 0, 2, 2, count=3, step=(2, 2))  # three 2x2 blocks on the diagonal
    assert disjoint((a,))
    assert disjoint((a, Region(0, 2, 2, 2)))  # beside the first block
    assert not disjoint((a, Region(3, 3, 1, 1)))  # inside the second block
    assert not disjoint((Region(0, 0, 2, 2, count=2, step=(1, 1)),))  # two copies of one region overlap
    assert disjoint((Region(0, 0, 2, 2, count=2, step=(2, 0)), Region(0, 2, 4, 1)))


@pytest.mark.parametrize("in_f,out_f,r_hat", SHAPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_type6_update_of_compact_regions_is_add_into_bit_for_bit(in_f, out_f, r_hat, fan_in_fan_out):
    """The merge keeps non-overlapping regions apart in a compact buffer and updates them
    there (add_into_regions): the same bits as add_into on the whole weight. Overlapping
    regions (in < r_hat: a block's columns wrap onto themselves) are not disjoint, and
    add_into_regions on views of the weight still gives add_into's bits."""
    op = _type6(in_f, out_f, r_hat, fan_in_fan_out)
    base, full, _ = _changed(op)
    regions = op.footprint()
    assert disjoint(tuple(regions)) == (in_f >= r_hat)
    views = [region.view(base).clone() for region in regions]  # compact, one tensor per region
    op.add_into_regions(views, 0.7)
    if in_f >= r_hat:
        for region, view in zip(regions, views):
            assert torch.equal(view, region.view(full))
    same = base.clone()
    op.add_into_regions([region.view(same) for region in regions], 0.7)
    assert torch.equal(same, full)


def test_add_into_regions_takes_only_the_footprint():
    op = _type6(48, 200, 14, False)
    views = [torch.zeros(region.count, region.rows, region.cols) for region in op.footprint()]
    with pytest.raises(ValueError, match="not the footprint's regions"):
        op.add_into_regions(views[:-1], 1.0)
    with pytest.raises(ValueError, match="not the footprint's regions"):
        op.add_into_regions([v.transpose(1, 2) for v in views], 1.0)
    whole = [MoraOp("w", (80, 48), "a", torch.zeros(14, 14), MoraOperator(48, 80, 14, 1)),
             LoraOp("w", (80, 48), "a", torch.zeros(2, 48), torch.zeros(80, 2), 1.0)]
    for other in whole:
        assert other.footprint() is None
        with pytest.raises(ValueError, match="no footprint"):
            other.add_into_regions([torch.zeros(1, 80, 48)], 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pair", [False, True], ids=["one-compact", "two-overlapping"])
def test_streamed_type6_merge_is_the_full_path_byte_for_byte(tmp_path, dtype, pair):
    """One adapter: its regions do not overlap and are merged in compact buffers; two
    adapters of different r_hat: their regions overlap and go through a full-size copy."""
    base = llama_like(dtype=dtype)
    write_tensor_base(tmp_path / "base", base, shards=2)
    write_mora_adapter(tmp_path / "a", mora_shapes(), mora_type=6, scale=0.05)
    write_mora_adapter(tmp_path / "b", mora_shapes(), mora_type=6, r=4, seed=1, scale=0.05)
    adapters = [load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b")][: 1 + pair]
    weights = [0.5, 1.5][: 1 + pair]
    report = merge_folder(tmp_path / "base", adapters, tmp_path / "out", weights=weights)
    got = read_folder(tmp_path / "out")
    from mora_core.plan import build_plan

    plan = build_plan({k: tuple(v.shape) for k, v in base.items()}, adapters, weights)
    assert plan.ops and all(op.footprint() is not None for ops in plan.ops.values() for op, _ in ops)
    for name, ops in plan.ops.items():
        want = merge_tensor(base[name], ops, name=name)  # widen all, add, round once
        assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
    deltas = [(merge_tensor(base[n], ops, out_dtype=torch.float32, name=n) - base[n].float()).abs().max().item()
              for n, ops in plan.ops.items()]
    assert report.to_dict()["max_abs_delta"] == pytest.approx(max(deltas), rel=1e-6)
    assert {disjoint(tuple(footprint(ops))) for ops in plan.ops.values()} == {not pair}  # the path taken


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_base_outside_the_footprint_is_still_refused(tmp_path, value):
    """The footprint merge writes back only the regions, but refuses a non-finite base value
    anywhere in the tensor, as the full path (widen, add, round, check) does."""
    base = llama_like(dtype=torch.bfloat16)
    name = "model.layers.1.mlp.down_proj.weight"
    write_mora_adapter(tmp_path / "a", mora_shapes(), mora_type=6, scale=0.05)
    adapters = [load_adapter(tmp_path / "a")]
    from mora_core.plan import build_plan

    (op, _), = build_plan({k: tuple(v.shape) for k, v in base.items()}, adapters, [1.0]).ops[name]
    outside = (~_mask(op.shape, op.footprint())).nonzero()[-1].tolist()
    base[name][tuple(outside)] = value
    write_tensor_base(tmp_path / "base", base)
    with pytest.raises(MergeError, match=f"{name} is not finite in bfloat16"):
        merge_folder(tmp_path / "base", adapters, tmp_path / "out")


def test_streamed_type6_merge_of_conv1d_weights_is_the_full_path_byte_for_byte(tmp_path):
    """Conv1D (`fan_in_fan_out`) stores `[in, out]`: the regions are transposed, in compact
    buffers (in >= r_hat) and on a full-size copy (in < r_hat: a block's columns wrap onto
    themselves, so its regions overlap)."""
    shapes = {"h.0.mlp.c_fc": (40, 150), "h.0.attn.c_attn": (40, 120), "h.0.mlp.c_proj": (10, 37)}
    g = torch.Generator().manual_seed(3)
    base = {f"{m}.weight": torch.randn(i, o, generator=g).to(torch.bfloat16) for m, (i, o) in shapes.items()}
    write_tensor_base(tmp_path / "base", base)
    write_mora_adapter(tmp_path / "a", shapes, mora_type=6, fan_in_fan_out=True, scale=0.05)
    adapters = [load_adapter(tmp_path / "a")]
    merge_folder(tmp_path / "base", adapters, tmp_path / "out")
    got = read_folder(tmp_path / "out")
    from mora_core.plan import build_plan

    plan = build_plan({k: tuple(v.shape) for k, v in base.items()}, adapters, [1.0])
    assert sorted(plan.ops) == sorted(base)
    for name, ops in plan.ops.items():
        assert torch.equal(got[name].view(torch.uint8), merge_tensor(base[name], ops, name=name).view(torch.uint8))
        assert not torch.equal(got[name], base[name])
    assert [disjoint(tuple(footprint(plan.ops[f"{m}.weight"]))) for m in shapes] == [True, True, False]
