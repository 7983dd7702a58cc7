"""The unmerged forward: adapters applied beside the base weights, the reference semantics.

`apply_unmerged(model, adapters, weights)` hooks every targeted module of a torch model so
that its output becomes `module(x; W) + sum_i w_i * op_i.forward(x, W)`, computed without
building any dense `dW` (MoRA compresses, multiplies by `M`, decompresses; LoRA goes
through its two thin matrices). Full tensors saved with an adapter (modules_to_save,
biases) are substituted in place, as PEFT does by swapping the module.

Validation compares a merged model with this: agreement proves the merge itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mora_core.adapter import Adapter
from mora_core.ops import Undo
from mora_core.plan import build_plan


@dataclass
class UnmergedHandle:
    """Undo for `apply_unmerged`: removes hooks and restores substituted tensors (newest first)."""

    undos: list[Undo] = field(default_factory=list)

    def remove(self) -> None:
        while self.undos:
            self.undos.pop()()

    def __enter__(self) -> UnmergedHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_unmerged(
    model: torch.nn.Module,
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
) -> UnmergedHandle:
    """Attach `adapters` (with `weights`) to `model` without merging; returns the undo handle.

    The tensor names of `model.state_dict()` play the role of the base folder's names, so
    the same resolution and shape checks as a merge apply (a `MergeError` on mismatch).
    Each op attaches itself (`DeltaOp.attach`): a forward branch or a substitution.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    state = model.state_dict(keep_vars=True)
    plan = build_plan({k: tuple(v.shape) for k, v in state.items()}, adapters, weights)
    handle = UnmergedHandle()
    try:
        for target, ops in plan.ops.items():
            module_name, _, param_name = target.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            for op, weight in ops:
                handle.undos.append(op.attach(module, param_name, weight))
    except BaseException:
        handle.remove()
        raise
    return handle
