"""Every delta op answers every hook: needs_base, add_into, delta, attach (and its undo)."""

from __future__ import annotations

import pytest
import torch

from mora_core.errors import MergeError
from mora_core.forward import apply_unmerged
from mora_core.merge import merge_tensor, needs_base
from mora_core.mora import MoraOperator, mora_rank
from mora_core.ops import DoraOp, LoraEmbeddingOp, LoraOp, MoraOp, ReplaceOp


def _ops(out_f: int = 6, in_f: int = 5):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, in_f, generator=g), torch.randn(out_f, 2, generator=g)
    rh = mora_rank(in_f, out_f, 2, 1)
    return {
        "lora": LoraOp("w", (out_f, in_f), "x", a=a, b=b, scaling=0.5),
        "dora": DoraOp("w", (out_f, in_f), "x", a=a, b=b, scaling=0.5, magnitude=torch.rand(out_f, generator=g) + 1),
        "mora": MoraOp("w", (out_f, in_f), "x", m=torch.randn(rh, rh, generator=g),
                       operator=MoraOperator(in_f, out_f, rh, 1)),
        "replace": ReplaceOp("w", (out_f, in_f), "x", value=torch.randn(out_f, in_f, generator=g)),
    }


def test_needs_base_is_declared_by_the_op():
    ops = _ops()
    assert {k: op.needs_base for k, op in ops.items()} == {"lora": False, "dora": True, "mora": False, "replace": True}
    assert needs_base([(ops["lora"], 1.0), (ops["dora"], 1.0)]) and not needs_base([(ops["mora"], 1.0)])


@pytest.mark.parametrize("kind", ["lora", "dora", "mora", "replace"])
def test_attach_equals_the_merged_module_and_undo_restores(kind):
    op = _ops()[kind]
    lin = torch.nn.Linear(5, 6, bias=False).double()
    w0 = lin.weight.detach().clone()
    x = torch.randn(3, 5, dtype=torch.float64)
    merged = merge_tensor(w0, [(op, 0.7)], accumulate=torch.float64)
    undo = op.attach(lin, "weight", 0.7)
    torch.testing.assert_close(lin(x), x @ merged.T)
    undo()
    torch.testing.assert_close(lin.weight.detach(), w0, atol=0, rtol=0)
    torch.testing.assert_close(lin(x), x @ w0.T)


def test_branch_op_on_a_bias_is_refused_and_replacement_of_a_bias_works():
    lin = torch.nn.Linear(5, 6).double()
    with pytest.raises(MergeError, match="cannot apply an adapter to w unmerged"):
        _ops()["lora"].attach(lin, "bias", 1.0)
    value = torch.arange(6, dtype=torch.float64)
    b0 = lin.bias.detach().clone()
    undo = ReplaceOp("bias", (6,), "x", value=value).attach(lin, "bias", 1.0)
    torch.testing.assert_close(lin.bias.detach(), value)
    undo()
    torch.testing.assert_close(lin.bias.detach(), b0, atol=0, rtol=0)


def test_replace_has_no_branch_form():
    op = _ops()["replace"]
    with pytest.raises(MergeError, match="replaced whole"):
        op.forward(torch.randn(2, 5), torch.randn(6, 5))


def test_embedding_lora_attach():
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(10, 4).double()
    op = LoraEmbeddingOp("weight", (10, 4), "x", a=torch.randn(2, 10, generator=g, dtype=torch.float64),
                         b=torch.randn(4, 2, generator=g, dtype=torch.float64), scaling=2.0)
    ids = torch.tensor([[1, 7, 3]])
    merged = merge_tensor(emb.weight.detach(), [(op, 1.0)], accumulate=torch.float64)
    with_undo = op.attach(emb, "weight", 1.0)
    torch.testing.assert_close(emb(ids), torch.nn.functional.embedding(ids, merged))
    with_undo()


def test_two_replacements_of_one_tensor_are_undone_newest_first():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 6, bias=False).double()

    from mora_core.adapter import Adapter
    from mora_core.spec import AdapterSpec

    model = M()
    w0 = model.lin.weight.detach().clone()
    spec = AdapterSpec(kind="lora", r=1, lora_alpha=1.0)
    adapters = [Adapter(spec=spec, layers={}, replacements={"lin.weight": torch.full((6, 5), float(i),
                                                                                       dtype=torch.float64)},
                        config={}, path=None, label=f"a{i}") for i in (1, 2)]
    with apply_unmerged(model, adapters, [1.0, 1.0]):
        torch.testing.assert_close(model.lin.weight.detach(), torch.full((6, 5), 2.0, dtype=torch.float64))
    torch.testing.assert_close(model.lin.weight.detach(), w0, atol=0, rtol=0)
