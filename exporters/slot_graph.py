"""The slotted torch model that is exported: the base model plus adapter branches as forward hooks.

Two kinds of graphs come from one base model:

- *slots* (`SlotsWrapper`): every slot parameter is a graph input of the exported
  program (so no exporter pass can fold it into a constant); after export the caller
  gives each a default initializer (`slot_defaults`), which makes it overridable;
- *mixed* (`MixedWrapper`): the given adapters are stacked inside the graph as
  initializers and an extra input `adapter_index` (int64 `[batch]`) picks each row's
  adapter by position, -1 being the base model.

The hooks read their tensors from a `Feeds` object that the wrapper's forward fills, so
the same module hooks serve tracing with any signature. `attach` returns the hook
handles; the model is unchanged once they are removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from exporters.slot_layout import BoundBranch, Slot, SlotLayout, branch_tensors
from exporters.slot_ops import MoraBranch, lora_branch, lora_rows

ADAPTER_INDEX = "adapter_index"


@dataclass
class Feeds:
    """Tensors the branches read during one forward (set by the wrapper)."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)


def _slot_hook(slots: list[Slot], feeds: Feeds):
    ops = {s.key: MoraBranch(s.operator()) for s in slots if s.kind == "mora"}

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for s in slots:
            if s.kind == "lora":
                a, b = (feeds.values[n] for n in s.names)
                output = output + lora_branch(x, a, b)
            else:
                output = output + ops[s.key](x, feeds.values[s.names[0]])
        return output

    return hook


def attach(model: torch.nn.Module, layout: SlotLayout, feeds: Feeds, mixed: bool = False) -> list:
    """Hook every slotted module of `model`; returns the handles (call `.remove()` on each)."""
    handles = []
    for module, slots in layout.by_module().items():
        hook = _mixed_hook(slots, feeds) if mixed else _slot_hook(slots, feeds)
        handles.append(model.get_submodule(module).register_forward_hook(hook))
    return handles


def slot_example(layout: SlotLayout, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[dict]]:
    """Example tensors and dynamic shapes for the slot inputs (one `rank_i` axis per LoRA slot)."""
    example, dynamic = [], []
    for i, s in enumerate(layout.slots):
        if s.kind == "lora":
            rank = torch.export.Dim(f"rank_{i}")
            example += [torch.zeros(2, s.in_features, dtype=dtype), torch.zeros(s.out_features, 2, dtype=dtype)]
            dynamic += [{0: rank}, {1: rank}]
        else:
            example.append(torch.zeros(s.r_hat, s.r_hat, dtype=dtype))
            dynamic.append({})
    return example, dynamic


def slot_defaults(layout: SlotLayout) -> dict[str, tuple[int, ...]]:
    """Shape of each parameter's default (zeros): rank 0 for LoRA, `[r_hat, r_hat]` for MoRA."""
    out: dict[str, tuple[int, ...]] = {}
    for s in layout.slots:
        if s.kind == "lora":
            a, b = s.names
            out[a], out[b] = (0, s.in_features), (s.out_features, 0)
        else:
            out[s.names[0]] = (int(s.r_hat), int(s.r_hat))
    return out


class SlotsWrapper(torch.nn.Module):
    """`(input_ids, attention_mask, slot parameters...) -> output`; the hooks read the parameters."""

    def __init__(self, inner: torch.nn.Module, feeds: Feeds, names: Sequence[str]):
        super().__init__()
        self.inner = inner
        self.feeds = feeds
        self.names = list(names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                slots: list[torch.Tensor]) -> torch.Tensor:
        self.feeds.values = dict(zip(self.names, slots))
        return self.inner(input_ids, attention_mask)


class KVSlotsWrapper(SlotsWrapper):
    """The KV-cache signature with slots: `(input_ids, attention_mask, position_ids, past, slots)`.

    `inner` is an `exporters.onnx_graph.KVCacheWrapper`; outputs are `(logits, *present)`.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                position_ids: torch.Tensor, past: list, slots: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        self.feeds.values = dict(zip(self.names, slots))
        return self.inner(input_ids, attention_mask, position_ids, past)


# ----------------------------------------------------------------------------- mixed

@dataclass
class Stack:
    """The adapters of one slot stacked for per-row gathering (last entry zero = the base)."""

    slot: Slot
    tensors: list[torch.Tensor]  # LoRA: At [n+1, in, R], Bt [n+1, R, out]; MoRA: Mt [n+1, r, r]
    table: torch.Tensor  # int64 [adapters + 1]: adapter position (last: -1) -> stack entry


def build_stacks(layout: SlotLayout, branches: Sequence[Sequence[BoundBranch]]) -> list[Stack]:
    """One stack per slot from the adapters' branches (weight 1, scale folded, float32)."""
    n = len(branches)
    stacks = []
    for slot in layout.slots:
        users = [(i, b) for i, bs in enumerate(branches) for b in bs if b.slot.key == slot.key]
        k = len(users)
        table = torch.full((n + 1,), k, dtype=torch.long)
        for entry, (i, _) in enumerate(users):
            table[i] = entry
        if slot.kind == "lora":
            rank = max(int(b.op.a.shape[0]) for _, b in users)
            at = torch.zeros(k + 1, slot.in_features, rank)
            bt = torch.zeros(k + 1, rank, slot.out_features)
            for entry, (_, b) in enumerate(users):
                a, bb = branch_tensors(b, 1.0)
                at[entry, :, : a.shape[0]] = a.T
                bt[entry, : a.shape[0], :] = bb.T
            tensors = [at, bt]
        else:
            mt = torch.zeros(k + 1, int(slot.r_hat), int(slot.r_hat))
            for entry, (_, b) in enumerate(users):
                mt[entry] = branch_tensors(b, 1.0)[0].T
            tensors = [mt]
        stacks.append(Stack(slot, tensors, table))
    return stacks


def _stack_names(i: int, stack: Stack) -> list[str]:
    return [f"stack_{i}_{j}" for j in range(len(stack.tensors))] + [f"table_{i}"]


def _mixed_hook(slots: list[Slot], feeds: Feeds):
    ops = {s.key: MoraBranch(s.operator()) for s in slots if s.kind == "mora"}

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        index = feeds.values[ADAPTER_INDEX]
        for s in slots:
            *tensors, table = feeds.values[f"slot:{s.key}"]
            rows = torch.index_select(table, 0, torch.where(index < 0, index + table.shape[0], index))
            if s.kind == "lora":
                output = output + lora_rows(x, tensors[0], tensors[1], rows)
            else:
                output = output + ops[s.key].rows(x, tensors[0], rows)
        return output

    return hook


class MixedWrapper(torch.nn.Module):
    """`(input_ids, attention_mask, adapter_index) -> output`, the stacks held as buffers."""

    def __init__(self, inner: torch.nn.Module, feeds: Feeds, stacks: Sequence[Stack]):
        super().__init__()
        self.inner = inner
        self.feeds = feeds
        self.keys = []
        for i, st in enumerate(stacks):
            names = _stack_names(i, st)
            for name, t in zip(names, [*st.tensors, st.table]):
                self.register_buffer(name, t.clone())
            self.keys.append((f"slot:{st.slot.key}", names))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                adapter_index: torch.Tensor) -> torch.Tensor:
        self._fill(adapter_index)
        return self.inner(input_ids, attention_mask)

    def _fill(self, adapter_index: torch.Tensor) -> None:
        values: dict[str, torch.Tensor] = {ADAPTER_INDEX: adapter_index}
        for key, names in self.keys:
            values[key] = [getattr(self, n) for n in names]  # type: ignore[assignment]
        self.feeds.values = values


class KVMixedWrapper(MixedWrapper):
    """`(input_ids, attention_mask, position_ids, past, adapter_index) -> (logits, *present)`."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                position_ids: torch.Tensor, past: list, adapter_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._fill(adapter_index)
        return self.inner(input_ids, attention_mask, position_ids, past)


def mixed_rows(n_adapters: int, batch: int, shift: int) -> np.ndarray:
    """A row assignment for validation: row i gets adapter `(i + shift) % (n + 1) - 1` (-1: base)."""
    return np.array([(i + shift) % (n_adapters + 1) - 1 for i in range(batch)], dtype=np.int64)
