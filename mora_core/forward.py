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
from mora_core.errors import MergeError
from mora_core.ops import DeltaOp, ReplaceOp
from mora_core.plan import build_plan


@dataclass
class UnmergedHandle:
    """Undo for `apply_unmerged`: removes hooks and restores substituted tensors."""

    hooks: list = field(default_factory=list)
    restore: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        with torch.no_grad():
            for param, original in self.restore:
                param.copy_(original)
        self.hooks.clear()
        self.restore.clear()

    def __enter__(self) -> UnmergedHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _hook(op: DeltaOp, weight: float, param_name: str):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        base = getattr(module, param_name)
        extra = op.forward(args[0], base.detach())
        return output + (weight * extra).to(output.dtype)

    return hook


def apply_unmerged(
    model: torch.nn.Module,
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
) -> UnmergedHandle:
    """Attach `adapters` (with `weights`) to `model` without merging; returns the undo handle.

    The tensor names of `model.state_dict()` play the role of the base folder's names, so
    the same resolution and shape checks as a merge apply (a `MergeError` on mismatch).
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    state = model.state_dict(keep_vars=True)
    plan = build_plan({k: tuple(v.shape) for k, v in state.items()}, adapters, weights)
    handle = UnmergedHandle()
    try:
        for target, ops in plan.ops.items():
            module_name, _, param_name = target.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            param = state[target]
            for op, weight in ops:
                if isinstance(op, ReplaceOp):
                    with torch.no_grad():
                        handle.restore.append((param, param.detach().clone()))
                        param.add_(op.value.to(param.dtype) - param, alpha=weight)
                    continue
                if param_name != "weight":
                    raise MergeError(f"{op.source}: cannot apply an adapter to {target} unmerged")
                handle.hooks.append(module.register_forward_hook(_hook(op, weight, param_name)))
    except BaseException:
        handle.remove()
        raise
    return handle
