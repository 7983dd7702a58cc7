"""MoRA against the paper's own implementation: every vector in shared/golden/mora."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mora_core.mora import MoraOperator, mora_rank
from tests.builders import golden_dir

CASES = json.loads((golden_dir() / "cases.json").read_text())["cases"]
ATOL_F64 = 1e-12  # the README's suggestion; type 6 matches too because the angles are float32 as in the reference


def _load(case):
    t = load_file(str(golden_dir() / case["file"]))
    # clone: aligned inputs reproduce the reference's last bits (see the golden README)
    return {k: v.clone() for k, v in t.items()}


@pytest.fixture(params=CASES, ids=[c["file"].removesuffix(".safetensors") for c in CASES])
def case(request):
    c = request.param
    return c, _load(c), MoraOperator(c["in_f"], c["out_f"], c["r_hat"], c["mora_type"])


def test_all_types_are_covered():
    assert {c["mora_type"] for c in CASES} == {1, 2, 3, 4, 6}
    assert len(CASES) >= 40


def test_rank_formula(case):
    c, _, _ = case
    assert mora_rank(c["in_f"], c["out_f"], c["r"], c["mora_type"]) == c["r_hat"]


def test_delta_matches_reference(case):
    _, t, op = case
    torch.testing.assert_close(op.delta(t["M"]), t["delta"], atol=ATOL_F64, rtol=0)


def test_forward_matches_reference(case):
    _, t, op = case
    torch.testing.assert_close(op.forward(t["x"], t["M"]), t["y_forward"], atol=ATOL_F64, rtol=0)


def test_fused_merge_matches_reference(case):
    c, t, op = case
    w0 = torch.randn(c["out_f"], c["in_f"], dtype=torch.float64)
    w = w0.clone()
    op.add_into(w, t["M"], 0.75)
    torch.testing.assert_close(w, w0 + 0.75 * t["delta"], atol=ATOL_F64, rtol=0)


def test_fused_merge_into_transposed_storage(case):
    """Conv1D stores [in, out]: merging into the transposed view must give delta.T."""
    c, t, op = case
    stored = torch.zeros(c["in_f"], c["out_f"], dtype=torch.float64)
    op.add_into(stored.T, t["M"])
    torch.testing.assert_close(stored, t["delta"].T, atol=ATOL_F64, rtol=0)


def test_float32_within_documented_bounds(case):
    _, t, op = case
    m32, x32 = t["M"].float(), t["x"].float()
    torch.testing.assert_close(op.delta(m32).double(), t["delta"], atol=1e-6, rtol=0)
    torch.testing.assert_close(op.forward(x32, m32).double(), t["y_forward"], atol=1e-6, rtol=0)
