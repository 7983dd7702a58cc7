"""The merge plan: which delta ops land on which base tensor, resolved before any write.

Adapter keys name *modules* as PEFT saw them (`model.layers.0.self_attn.q_proj`); base
files name *tensors*, sometimes with a different prefix (GPT-2 checkpoints saved without
`transformer.`, encoders saved with or without `bert.`). `NameResolver` maps one to the
other: exact name first, then a unique match after dropping leading components on
either side. Anything that does not resolve uniquely, or whose shape does not fit, is a
`MergeError` raised here, so a merge never writes half an output.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mora_core.adapter import Adapter
from mora_core.errors import MergeError
from mora_core.ops import DeltaOp, ReplaceOp


class NameResolver:
    """Maps an adapter-side tensor name to the base's name for the same tensor."""

    def __init__(self, names: Sequence[str]):
        self.names = set(names)
        self._by_suffix: dict[str, set[str]] = defaultdict(set)
        for name in names:
            parts = name.split(".")
            for k in range(1, len(parts) - 1):
                self._by_suffix[".".join(parts[k:])].add(name)

    def resolve(self, name: str) -> str | None:
        """The base name, or None when nothing matches. Raises on an ambiguous match."""
        if name in self.names:
            return name
        parts = name.split(".")
        for k in range(1, len(parts) - 1):  # adapter name has extra leading components
            shorter = ".".join(parts[k:])
            if shorter in self.names:
                return shorter
        found = self._by_suffix.get(name, set())  # base name has extra leading components
        if len(found) > 1:
            raise MergeError(f"{name} matches several base tensors: {', '.join(sorted(found)[:4])}")
        return next(iter(found), None)


@dataclass
class MergePlan:
    """`ops[name]` lists `(op, weight)` for base tensor `name`, in adapter order."""

    ops: dict[str, list[tuple[DeltaOp, float]]] = field(default_factory=dict)
    keys_used: dict[str, int] = field(default_factory=dict)  # adapter label -> modules/tensors applied
    untied: dict[str, str] = field(default_factory=dict)  # new tensor name -> base tensor it starts from

    def targets(self) -> set[str]:
        return set(self.ops)


def build_plan(
    base_shapes: Mapping[str, tuple[int, ...]],
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    tied: Mapping[str, str] | None = None,
) -> MergePlan:
    """Bind every adapter layer and full tensor to a base tensor, checking shapes.

    `tied` maps a tensor that the checkpoint omits because it is tied (e.g.
    `lm_head.weight`) to the tensor it shares (the input embedding). When an adapter
    touches either side, the pair is untied: the omitted tensor becomes its own output
    tensor, so neither trained matrix overwrites the other.
    """
    if len(weights) != len(adapters):
        raise MergeError(f"{len(adapters)} adapters but {len(weights)} weights")
    tied = dict(tied or {})
    shapes = dict(base_shapes)
    for alias, source in tied.items():
        if alias not in shapes and source in shapes:
            shapes[alias] = shapes[source]
    resolver = NameResolver(list(shapes))
    plan = MergePlan()
    for adapter, weight in zip(adapters, weights):
        used = 0
        for module, layer in sorted(adapter.layers.items()):
            target = _resolve(resolver, layer.weight_name, adapter.label, f"module {module}")
            plan.ops.setdefault(target, []).append(
                (layer.bind(target, shapes[target], adapter.spec, adapter.label), weight))
            used += 1
        for name, value in sorted(adapter.replacements.items()):
            target = _resolve(resolver, name, adapter.label, f"tensor {name}")
            if tuple(value.shape) != tuple(shapes[target]):
                raise MergeError(f"{adapter.label}: tensor {name} is {list(value.shape)} but base "
                                 f"{target} is {list(shapes[target])}")
            plan.ops.setdefault(target, []).append(
                (ReplaceOp(target, tuple(shapes[target]), adapter.label, value=value), weight))
            used += 1
        plan.keys_used[adapter.label] = used
    for alias, source in tied.items():
        if alias in base_shapes:
            continue
        if alias in plan.ops or source in plan.ops:
            plan.untied[alias] = source
    return plan


def _resolve(resolver: NameResolver, name: str, label: str, what: str) -> str:
    try:
        target = resolver.resolve(name)
    except MergeError as exc:
        raise MergeError(f"{label}: {what}: {exc}") from None
    if target is None:
        raise MergeError(f"{label}: {what} matches no tensor of the base model (looked for {name})")
    return target
