"""Properties of the MoRA operators over arbitrary shapes, including the shapes where the
paper's code crashes (type 6 with one input block, in_features < r_hat / 2): merging and
the unmerged forward must always agree, and the fused merge must equal the dense one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mora_core.errors import AdapterError
from mora_core.mora import MoraOperator, mora_rank

shapes = st.tuples(st.integers(1, 96), st.integers(1, 96), st.integers(1, 16), st.sampled_from([1, 2, 3, 4, 6]))


def _op(in_f: int, out_f: int, r: int, t: int) -> MoraOperator:
    rh = mora_rank(in_f, out_f, r, t)
    if t == 6 and rh == 0:
        rh = 2
    return MoraOperator(in_f, out_f, rh, t)


@settings(max_examples=300, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_merge_equals_unmerged_forward(shape, seed):
    op = _op(*shape)
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(op.r_hat, op.r_hat, generator=g, dtype=torch.float64)
    x = torch.randn(4, op.in_features, generator=g, dtype=torch.float64)
    torch.testing.assert_close(x @ op.delta(m).T, op.forward(x, m), atol=1e-10, rtol=1e-10)


@settings(max_examples=300, deadline=None)
@given(shapes, st.floats(-2, 2, allow_nan=False), st.integers(0, 2**31 - 1))
def test_fused_merge_equals_dense(shape, weight, seed):
    op = _op(*shape)
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(op.r_hat, op.r_hat, generator=g, dtype=torch.float64)
    w0 = torch.randn(op.out_features, op.in_features, generator=g, dtype=torch.float64)
    w = w0.clone()
    op.add_into(w, m, weight)
    torch.testing.assert_close(w, w0 + weight * op.delta(m), atol=1e-12, rtol=0)
    stored = w0.T.clone()  # Conv1D layout
    op.add_into(stored.T, m, weight)
    torch.testing.assert_close(stored.T, w, atol=1e-12, rtol=0)


@settings(max_examples=200, deadline=None)
@given(shapes)
def test_operators_are_linear_in_m(shape):
    op = _op(*shape)
    a = torch.randn(op.r_hat, op.r_hat, dtype=torch.float64)
    b = torch.randn(op.r_hat, op.r_hat, dtype=torch.float64)
    torch.testing.assert_close(op.delta(2 * a - b), 2 * op.delta(a) - op.delta(b), atol=1e-12, rtol=0)


@pytest.mark.parametrize("in_f,out_f,r", [(30, 200, 8), (16, 16, 8), (3, 40, 8), (5, 7, 16)])
def test_type6_single_block_where_the_reference_crashes(in_f, out_f, r):
    """nb == 1 (in_f <= r_hat): the paper's delta raises; ours agrees with its forward."""
    op = MoraOperator(in_f, out_f, mora_rank(in_f, out_f, r, 6), 6)
    assert op.n_blocks == 1
    m = torch.randn(op.r_hat, op.r_hat, dtype=torch.float64)
    x = torch.randn(3, in_f, dtype=torch.float64)
    torch.testing.assert_close(x @ op.delta(m).T, op.forward(x, m), atol=1e-12, rtol=0)
    # block 0 has rotation angle 0: delta is M itself, read through the wrap-around maps
    feature = torch.arange(op.r_hat) % in_f
    dense = torch.zeros(op.r_hat, in_f, dtype=torch.float64).index_add_(1, feature, m)
    torch.testing.assert_close(op.delta(m), dense[torch.arange(out_f) % op.r_hat], atol=1e-12, rtol=0)


def test_tiny_input_wraps_features_many_times():
    """in_f < r_hat / 2: every feature feeds several positions (p -> p mod in_f)."""
    op = MoraOperator(3, 10, 8, 1)
    m = torch.eye(8, dtype=torch.float64)
    d = op.delta(m)
    # output o reads slot o % 8; slot s sums features p % 3 over positions p == s
    assert d[0].tolist() == [1.0, 0.0, 0.0] and d[3].tolist() == [1.0, 0.0, 0.0]
    assert d.sum().item() == 10.0


def test_type6_needs_even_rank():
    with pytest.raises(AdapterError, match="even"):
        MoraOperator(64, 64, 7, 6)


def test_unknown_type_is_refused():
    with pytest.raises(AdapterError, match="mora_type 5"):
        MoraOperator(64, 64, 8, 5)
