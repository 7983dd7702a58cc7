"""Adapter slots of a base graph: which module carries which slot, and the parameters of each.

A *slot graph* is the base model exported once, with adapter branches on the modules
that adapters target. The branch weights are overridable initializers (graph inputs with
a default), so ONNX Runtime swaps them per run from an `.onnx_adapter` file:

- a LoRA slot on module `m`: `m.lora_A` `[rank, in]` and `m.lora_B` `[out, rank]`, with a
  dynamic `rank` axis (LoRAs of any rank share one session). The adapter file holds
  `B * scaling * weight`, so the graph computes `(x A^T) B^T` with no scale input.
  Defaults are `[0, in]` and `[out, 0]`: no active adapter adds exactly nothing.
- a MoRA slot on module `m` for (type, r_hat): `m.mora_M.t{type}r{r_hat}` `[r_hat, r_hat]`
  between fixed compress/decompress operators (default zeros). A module may hold several
  MoRA slots (adapters of other ranks or types), and a LoRA slot beside them.

This module is plain data and the rules that bind an adapter to a layout (`slots_of`,
`fit`, `parameters`); the torch branches are in `exporters.slot_ops`. It builds on
`mora_core.plan.build_plan`, so adapter keys resolve to modules exactly as a merge does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from exporters.errors import ExportError
from mora_core.adapter import Adapter
from mora_core.errors import MergeError
from mora_core.mora import MoraOperator
from mora_core.ops import LoraOp, MoraOp
from mora_core.plan import build_plan

WEIGHT_SUFFIX = ".weight"


@dataclass(frozen=True)
class Slot:
    """One slot: a LoRA pair (`kind="lora"`) or one MoRA square matrix (`kind="mora"`)."""

    module: str  # the model's module path, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "lora" | "mora"
    in_features: int
    out_features: int
    mora_type: int | None = None
    r_hat: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The graph's parameter (overridable initializer) names of this slot."""
        if self.kind == "lora":
            return (f"{self.module}.lora_A", f"{self.module}.lora_B")
        return (f"{self.module}.mora_M.t{self.mora_type}r{self.r_hat}",)

    @property
    def key(self) -> tuple:
        return (self.module, self.kind, self.mora_type, self.r_hat)

    def operator(self) -> MoraOperator:
        assert self.kind == "mora" and self.mora_type is not None and self.r_hat is not None
        return MoraOperator(self.in_features, self.out_features, self.r_hat, self.mora_type)

    def describe(self) -> str:
        return "LoRA" if self.kind == "lora" else f"MoRA type {self.mora_type} r_hat {self.r_hat}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"module": self.module, "kind": self.kind, "in_features": self.in_features,
                             "out_features": self.out_features, "parameters": list(self.names)}
        if self.kind == "mora":
            d.update(mora_type=self.mora_type, r_hat=self.r_hat)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Slot:
        return cls(d["module"], d["kind"], int(d["in_features"]), int(d["out_features"]),
                   d.get("mora_type"), d.get("r_hat"))


@dataclass
class SlotLayout:
    """Every slot of a graph, in a stable order (module, then LoRA before MoRA)."""

    slots: list[Slot] = field(default_factory=list)

    def by_module(self) -> dict[str, list[Slot]]:
        out: dict[str, list[Slot]] = {}
        for s in self.slots:
            out.setdefault(s.module, []).append(s)
        return out

    def find(self, module: str, kind: str, mora_type: int | None = None, r_hat: int | None = None) -> Slot | None:
        for s in self.slots:
            if s.module == module and s.kind == kind and (kind == "lora" or (s.mora_type, s.r_hat) == (mora_type, r_hat)):
                return s
        return None

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.slots]

    @classmethod
    def from_list(cls, items: list[Mapping[str, Any]]) -> SlotLayout:
        return cls([Slot.from_dict(d) for d in items])


# ----------------------------------------------------------------------------- adapters -> slots

@dataclass(frozen=True)
class BoundBranch:
    """One adapter's branch on one module: the slot shape it needs and the op holding its tensors."""

    module: str
    op: LoraOp | MoraOp
    slot: Slot


def bind(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> list[BoundBranch]:
    """Resolve `adapter` against the model's tensor shapes (as a merge would) into branches.

    Raises `ExportError` for what a slot cannot hold: DoRA (its update depends on the base
    weight's norm), embedding LoRA, and full tensors (modules_to_save, biases).
    """
    try:
        plan = build_plan(shapes, [adapter], [1.0])
    except MergeError as exc:
        raise ExportError(str(exc)) from None
    out: list[BoundBranch] = []
    for target, ops in sorted(plan.ops.items()):
        for op, _ in ops:
            module = target[: -len(WEIGHT_SUFFIX)] if target.endswith(WEIGHT_SUFFIX) else target
            if isinstance(op, LoraOp) and target.endswith(WEIGHT_SUFFIX):
                slot = Slot(module, "lora", int(op.a.shape[1]), int(op.b.shape[0]))
            elif isinstance(op, MoraOp) and target.endswith(WEIGHT_SUFFIX):
                o = op.operator
                slot = Slot(module, "mora", o.in_features, o.out_features, o.mora_type, o.r_hat)
            else:
                what = type(op).__name__.removesuffix("Op")
                raise ExportError(f"{adapter.label}: {target}: a {what} update cannot be served from adapter "
                                  "slots (only LoRA and MoRA branches on linear layers); merge it instead")
            out.append(BoundBranch(module, op, slot))
    return out


def slots_of(branches_per_adapter: list[list[BoundBranch]]) -> SlotLayout:
    """The union of the slots the adapters need (one LoRA slot per module, one MoRA slot per
    module and (type, r_hat))."""
    seen: dict[tuple, Slot] = {}
    for branches in branches_per_adapter:
        for b in branches:
            seen.setdefault(b.slot.key, b.slot)
    order = sorted(seen.values(), key=lambda s: (s.module, s.kind != "lora", s.mora_type or 0, s.r_hat or 0))
    return SlotLayout(order)


def fit(label: str, branches: list[BoundBranch], layout: SlotLayout, graph: str) -> list[tuple[Slot, BoundBranch]]:
    """Pair each branch with its slot of `layout`; an `ExportError` names the first module that does not fit."""
    out = []
    for b in branches:
        slot = layout.find(b.module, b.slot.kind, b.slot.mora_type, b.slot.r_hat)
        if slot is None:
            have = [s.describe() for s in layout.by_module().get(b.module, [])]
            why = (f"has {', '.join(have)} slot(s), not {b.slot.describe()}" if have else "is not slotted")
            raise ExportError(f"{label}: module {b.module} {why} in the graph {graph}")
        if (slot.in_features, slot.out_features) != (b.slot.in_features, b.slot.out_features):
            raise ExportError(f"{label}: module {b.module} is {b.slot.in_features}->{b.slot.out_features} but the "
                              f"graph's slot is {slot.in_features}->{slot.out_features}")
        out.append((slot, b))
    return out


def branch_tensors(b: BoundBranch, weight: float) -> tuple[torch.Tensor, ...]:
    """float32 values of a branch with its scale folded in: LoRA (A, B*scaling*weight), MoRA (M*weight,)."""
    op = b.op
    if isinstance(op, LoraOp):
        return op.a.to(torch.float32), op.b.to(torch.float32) * float(op.scaling * weight)
    return (op.m.to(torch.float32) * float(weight),)


def parameters(pairs: list[tuple[Slot, BoundBranch]], weight: float, dtype: str) -> dict[str, np.ndarray]:
    """The overridable-initializer values for one adapter (what its `.onnx_adapter` file holds)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    out: dict[str, np.ndarray] = {}
    for slot, b in pairs:
        for name, t in zip(slot.names, branch_tensors(b, weight)):
            out[name] = np.ascontiguousarray(t.numpy().astype(np_dtype))
    return out
