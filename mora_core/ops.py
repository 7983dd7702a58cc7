"""Delta ops: one adapter's update to one base tensor, each kind with one job.

An op is bound to a base tensor (its name and stored shape). Every op answers every hook
(PEFT's `LoraVariant` is the model), so no caller ever asks which kind it holds:

- `add_into(w, weight, base)`: `w += weight * dW` in place, `w` in the tensor's *stored*
  layout and in the accumulation dtype (float32/float64); `base` is the original base
  tensor, needed by ops whose update depends on it (DoRA, full replacements);
- `delta(base)`: the dense `dW` in stored layout (tests, reports);
- `forward(x, base)`: the unmerged contribution to the module's output, i.e. the reference
  semantics: `module(x; W + dW) == module(x; W) + forward(x, W)`;
- `attach(module, param_name, weight) -> undo`: apply the op to a live torch module without
  merging (a forward branch for low-rank ops, an in-place substitution for full tensors);
- `needs_base`: whether `add_into` reads the original base tensor (the merge loop keeps a
  pristine copy only then);
- `footprint()`: the regions of the tensor `add_into` reads and writes (None: all), so
  the merge widens to float32 only those (MoRA type 6: its diagonal blocks, a strided
  region per period, see `mora_core.region`);
- `add_into_regions(views, weight)`: `add_into` on the footprint's regions alone, held in
  any storage (the merge keeps non-overlapping regions in a compact buffer).

The merge loop and the unmerged forward only ever call these, so the math of each
adapter kind lives in exactly one place.

Stored vs logical layout: a `torch.nn.Linear` weight is `[out, in]`; GPT-2's Conv1D stores
`[in, out]` (`fan_in_fan_out`). Ops work on the logical `[out, in]` view, which for Conv1D
is `w.T`: in-place ops on that view write the stored tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mora_core.errors import MergeError
from mora_core.mora import MoraOperator
from mora_core.region import Region

Undo = Callable[[], None]


@dataclass
class DeltaOp(ABC):
    target: str  # base tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # stored shape of the base tensor
    source: str  # which adapter it came from (for reports and errors)

    needs_base: ClassVar[bool] = False  # does add_into read the original base tensor?

    @abstractmethod
    def add_into(self, w: torch.Tensor, weight: float, base: torch.Tensor) -> None:
        """`w += weight * dW` in place (stored layout); `base` is the original tensor."""

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """The dense `dW` in stored layout."""
        w = torch.zeros(self.shape, dtype=base.dtype if base.is_floating_point() else torch.float32)
        self.add_into(w, 1.0, base)
        return w

    @abstractmethod
    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The unmerged branch: `module(x; W + dW) - module(x; W)` for the module's input `x`."""

    def footprint(self) -> tuple[Region, ...] | None:
        """The regions of the stored 2-D tensor that `add_into` reads and writes (the rest of
        `w` may hold anything and is left alone; regions may overlap); None: the whole tensor."""
        return None

    def add_into_regions(self, views: Sequence[torch.Tensor], weight: float) -> None:
        """`add_into` restricted to the footprint: `views[i]` (`[count, rows, cols]`, stored
        orientation) holds the elements of `footprint()[i]`, as views of the weight or as a
        compact copy when the regions do not overlap; the update never reads or writes
        anything else. Only ops that declare a footprint answer it."""
        raise ValueError(f"{self.source}: the update of {self.target} covers the whole tensor (no footprint)")

    def attach(self, module: torch.nn.Module, param_name: str, weight: float) -> Undo:
        """Add `weight * forward(x, W)` to `module`'s output (a forward hook); returns the undo.

        Low-rank ops touch the module's `weight` only; anything else is a `MergeError`.
        """
        if param_name != "weight":
            raise MergeError(f"{self.source}: cannot apply an adapter to {self.target} unmerged")

        def hook(mod: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            extra = self.forward(args[0], getattr(mod, param_name).detach())
            return output + (weight * extra).to(output.dtype)

        return module.register_forward_hook(hook).remove


def _logical(w: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return w.T if fan_in_fan_out else w


@dataclass
class LoraOp(DeltaOp):
    """`dW = scaling * B @ A` (PEFT), on a Linear/Conv1D weight."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    fan_in_fan_out: bool = False

    def add_into(self, w: torch.Tensor, weight: float, base: torch.Tensor) -> None:
        a, b = self.a.to(w.dtype), self.b.to(w.dtype)
        if self.fan_in_fan_out:  # stored [in, out] += (B @ A).T = A.T @ B.T
            w.addmm_(a.T, b.T, alpha=weight * self.scaling)
        else:
            w.addmm_(b, a, alpha=weight * self.scaling)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.to(x.dtype).T) @ self.b.to(x.dtype).T * self.scaling


@dataclass
class LoraEmbeddingOp(DeltaOp):
    """PEFT's embedding LoRA: `dW = scaling * (B @ A).T` on a `[num_embeddings, dim]` table."""

    a: torch.Tensor  # lora_embedding_A [r, num_embeddings]
    b: torch.Tensor  # lora_embedding_B [dim, r]
    scaling: float

    def add_into(self, w: torch.Tensor, weight: float, base: torch.Tensor) -> None:
        w.addmm_(self.a.to(w.dtype).T, self.b.to(w.dtype).T, alpha=weight * self.scaling)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        # x holds token ids here
        rows = F.embedding(x, self.a.T.to(base.dtype))
        return rows @ self.b.to(base.dtype).T * self.scaling


@dataclass
class DoraOp(DeltaOp):
    """DoRA: `W' = m / ||W + s B A||_row * (W + s B A)`, so `dW = W' - W` (depends on W).

    The norm is taken per output feature over the input features, as PEFT does, and on
    the *original* base weight, so several adapters still merge to `W + sum_i w_i dW_i`.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor  # [out]
    fan_in_fan_out: bool = False

    needs_base: ClassVar[bool] = True

    def _merged_logical(self, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w0 = _logical(base, self.fan_in_fan_out).to(dtype)
        combined = torch.addmm(w0, self.b.to(dtype), self.a.to(dtype), alpha=self.scaling)
        factor = self.magnitude.to(dtype) / torch.linalg.vector_norm(combined, dim=1)
        return combined * factor.unsqueeze(1)

    def add_into(self, w: torch.Tensor, weight: float, base: torch.Tensor) -> None:
        merged = self._merged_logical(base, w.dtype)
        merged -= _logical(base, self.fan_in_fan_out).to(w.dtype)
        _logical(w, self.fan_in_fan_out).add_(merged, alpha=weight)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        w0 = _logical(base, self.fan_in_fan_out).to(x.dtype)
        combined = torch.addmm(w0, self.b.to(x.dtype), self.a.to(x.dtype), alpha=self.scaling)
        mns = self.magnitude.to(x.dtype) / torch.linalg.vector_norm(combined, dim=1)
        lora = (x @ self.a.to(x.dtype).T) @ self.b.to(x.dtype).T * self.scaling
        return (mns - 1) * (x @ w0.T) + mns * lora


@dataclass
class MoraOp(DeltaOp):
    """MoRA: a square `M` between fixed compress/decompress operators (scaling 1)."""

    m: torch.Tensor  # [r_hat, r_hat]
    operator: MoraOperator
    fan_in_fan_out: bool = False

    def add_into(self, w: torch.Tensor, weight: float, base: torch.Tensor) -> None:
        self.operator.add_into(_logical(w, self.fan_in_fan_out), self.m, weight)

    def footprint(self) -> tuple[Region, ...] | None:
        regions = self.operator.footprint()  # logical [out, in]
        if regions is None or not self.fan_in_fan_out:
            return regions
        return tuple(region.transposed() for region in regions)

    def add_into_regions(self, views: Sequence[torch.Tensor], weight: float) -> None:
        logical = [v.transpose(1, 2) for v in views] if self.fan_in_fan_out else views
        self.operator.add_into_regions(logical, self.m, weight)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return self.operator.forward(x, self.m.to(x.dtype))


@dataclass
class ReplaceOp(DeltaOp):
    """A full tensor saved with the adapter (modules_to_save, bias='all'/'lora_only',
    saved embedding layers): `dW = T - W`, so weight 1 gives exactly `T`.

    Unmerged, it is applied as PEFT does (by substitution): `attach` writes
    `W + weight * (T - W)` into the live parameter and the undo restores `W`.
    """

    value: torch.Tensor

    needs_base: ClassVar[bool] = True

    def add_into(self, w: torch.Tensor, weight: float, base: torch.Tensor) -> None:
        if weight == 1.0:  # w - W + T: exactly T when nothing else touched w
            w.sub_(base.to(w.dtype)).add_(self.value.to(w.dtype))
        else:
            w.add_(self.value.to(w.dtype) - base.to(w.dtype), alpha=weight)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """No branch form: `module(x; T) - module(x; W)` depends on the module (a bias, an
        embedding table, a Conv1D weight...), which an op does not know. Live modules get a
        replacement through `attach`, which works for every kind of tensor."""
        raise MergeError(f"{self.source}: {self.target} is replaced whole; apply it with attach(), "
                         "not as a forward branch")

    def attach(self, module: torch.nn.Module, param_name: str, weight: float) -> Undo:
        param = getattr(module, param_name)
        original = param.detach().clone()
        with torch.no_grad():
            param.add_(self.value.to(param.dtype) - param, alpha=weight)

        def undo() -> None:
            with torch.no_grad():
                param.copy_(original)

        return undo
