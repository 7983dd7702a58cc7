"""A transformers model that holds its weights once: built on the meta device, bound in place.

Why: `from_config` allocates and randomly initialises every parameter (twice when the
embeddings get untied) only for the exporter to overwrite them with the base's weights,
and a whole-model state dict of those weights sat beside the model. Here parameters are
created on the meta device (buffers stay real: rotary tables and position ids are
computed in `__init__`), then each one is bound to a tensor read from the base folder,
merged (mora_core's `merge_tensor`, float32 accumulation) and cast once to the model's
dtype. Peak memory is the model plus the few tensors being prepared.

Contract: `merged_model(...)` gives the same module, bit for bit, as building with
`from_config`, loading the base's tensors in float32, merging them with
`merge_state_dict` and casting the model to `dtype` (the exporter's former path); ties
stay ties (a shared parameter is bound once and remains shared). A base tensor with no
place in the model is listed in `ignored`; a parameter with no base tensor, or a shape
that does not fit, is an `ExportError` naming it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporters.errors import ExportError
from exporters.hf_model import build_model, tied_output
from mora_core.adapter import Adapter
from mora_core.checkpoint import Checkpoint
from mora_core.merge import merge_tensor
from mora_core.plan import MergePlan, NameResolver, build_plan
from mora_core.safetensors_io import SafetensorsFile


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lives on the meta device (no memory).

    Modules create `Parameter(torch.empty(...))` and then initialise it; registering it
    on meta first makes the initialisation a no-op and frees the (never touched) empty
    allocation. Buffers are left alone.
    """
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(config, untie: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The architecture of `config` with parameters on meta (buffers real, cast to `dtype`)."""
    with parameters_on_meta():
        model = build_model(copy.deepcopy(config), untie=untie)
    if dtype != torch.float32:
        model.to(dtype)  # buffers, as the former `model.to(dtype)` cast them; meta params stay meta
    return model


@dataclass
class BaseLayout:
    """Where each of the model's tensors lives in the base folder (headers only, nothing read)."""

    root: Path
    sources: dict[str, tuple[SafetensorsFile, str]]  # model tensor name -> (file, checkpoint name)
    ignored: list[str]  # checkpoint tensors the model has no place for (e.g. a pretraining head)
    tied: dict[str, str]  # tensor the checkpoint omits because it is tied -> the tensor it shares
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def base_layout(base: Checkpoint, model: torch.nn.Module) -> BaseLayout:
    """Bind the base's tensors to `model`'s names and shapes (checkpoint prefixes resolved)."""
    state = model.state_dict()
    resolver = NameResolver(list(state))
    sources: dict[str, tuple[SafetensorsFile, str]] = {}
    ignored: list[str] = []
    for f in base.files:
        for name, info in f.tensors.items():
            target = resolver.resolve(name)
            if target is None:
                ignored.append(name)
                continue
            if tuple(info.shape) != tuple(state[target].shape):
                raise ExportError(f"{f.path}: tensor {name} is {list(info.shape)} but the architecture in "
                                  f"config.json expects {list(state[target].shape)} for {target}")
            sources[target] = (f, name)
    tied = {a: s for a, s in tied_output(model).items() if a not in sources and s in sources}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in params if n not in sources and n not in tied)
    if missing:
        raise ExportError(f"{base.root}: the weights have no tensor for {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + "; does config.json match the safetensors files?")
    shapes = {n: tuple(f.tensors[c].shape) for n, (f, c) in sources.items()}
    return BaseLayout(base.root, sources, ignored, tied, shapes)


def merge_plan(layout: BaseLayout, adapters: Sequence[Adapter], weights: Sequence[float]) -> MergePlan:
    """mora_core's plan for `adapters` on the base, under the model's tensor names."""
    return build_plan(layout.shapes, adapters, weights, layout.tied)


def read_base(layout: BaseLayout, name: str) -> torch.Tensor:
    """One base tensor under the model's `name` (an untied alias reads its source), float32."""
    f, ckpt = layout.sources[name] if name in layout.sources else layout.sources[layout.tied[name]]
    value = f.read(ckpt)
    return value.to(torch.float32) if value.is_floating_point() else value


class BaseValues(Mapping[str, torch.Tensor]):
    """The base value (float32) of each of `names`, read from the files only when asked.

    Lets the unmerged reference put back the tensors a merge changed one at a time,
    instead of keeping a copy of each of them for the whole run.
    """

    def __init__(self, layout: BaseLayout, names: Sequence[str]):
        self._layout = layout
        self._names = list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return read_base(self._layout, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _slots(model: torch.nn.Module) -> dict[str, list[tuple[torch.nn.Module, str, bool]]]:
    """Model tensor name -> every (module, attribute, is_parameter) slot holding that tensor.

    A tied parameter has several names and slots; each of its names maps to all of them,
    so binding it under any name rebinds every slot.
    """
    by_tensor: dict[int, list[tuple[torch.nn.Module, str, bool]]] = {}
    names: dict[str, int] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                by_tensor.setdefault(id(p), []).append((module, attr, True))
                names[prefix + attr] = id(p)
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                by_tensor.setdefault(id(b), []).append((module, attr, False))
                names[prefix + attr] = id(b)
    return {n: by_tensor[i] for n, i in names.items()}


def bind(model: torch.nn.Module, name: str, value: torch.Tensor,
         slots: Mapping[str, list[tuple[torch.nn.Module, str, bool]]]) -> None:
    """Make `value` the tensor behind `name` (every slot sharing it), without a copy."""
    shared: torch.nn.Parameter | None = None
    for module, attr, is_param in slots[name]:
        if is_param:
            if shared is None:
                shared = torch.nn.Parameter(value, requires_grad=False)
            module._parameters[attr] = shared
        else:
            module._buffers[attr].copy_(value)


def bind_weights(model: torch.nn.Module, layout: BaseLayout, plan: MergePlan | None, dtype: torch.dtype,
                 accumulate: torch.dtype = torch.float32) -> None:
    """Give every parameter of `model` its base tensor with `plan` folded in, cast to `dtype`.

    Tensors are prepared one at a time in file order: read, converted to float32, merged
    (`merge_tensor`, in `accumulate`), cast once to `dtype` (floating tensors only), bound.
    """
    slots = _slots(model)
    ops = plan.ops if plan is not None else {}
    untied = plan.untied if plan is not None else {}
    done: set[int] = set()
    order = list(layout.sources) + [a for a in untied if a not in layout.sources]
    with torch.no_grad():
        for name in order:
            if name not in slots:
                continue
            if id(slots[name]) in done:  # a tied tensor already bound under another name
                continue
            done.add(id(slots[name]))
            value = read_base(layout, name)
            if name in ops:
                value = merge_tensor(value, ops[name], accumulate=accumulate, name=name)
            if value.is_floating_point() and value.dtype != dtype:
                value = value.to(dtype)
            bind(model, name, value, slots)
            del value
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ExportError(f"{layout.root}: the weights have no tensor for {left[0]}"
                          + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))


@dataclass
class MergedModel:
    """A model with the merged weights, and what the merge did to the base's layout."""

    model: torch.nn.Module
    layout: BaseLayout
    plan: MergePlan
    untied: dict[str, str]  # alias given its own tensor -> the base tensor it started from

    def changed(self) -> list[str]:
        """Tensors whose value differs from the base (merged, or untied aliases)."""
        return sorted(set(self.plan.ops) | set(self.untied))


def merged_model(config, base: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float],
                 dtype: torch.dtype = torch.float32, accumulate: torch.dtype = torch.float32,
                 merge: bool = True) -> MergedModel:
    """`config`'s architecture holding the checkpoint `base` with `adapters` merged, in `dtype`.

    The layout is resolved on a meta model first, so the merge plan (and whether the
    embeddings must be untied) is known before any weight is read; the model is then
    built once, untied when needed. `merge=False` binds the base weights unchanged
    (still untied where the merge would untie, for an unmerged reference of the same
    architecture).
    """
    probe = empty_model(config)
    layout = base_layout(base, probe)
    plan = merge_plan(layout, adapters, weights)
    untied = dict(plan.untied)
    if untied:  # same tensor names; the alias now has its own parameter, read from its source
        model = empty_model(config, untie=True, dtype=dtype)
    else:
        model = probe.to(dtype) if dtype != torch.float32 else probe
    bound_plan = plan if merge else MergePlan(untied=untied)
    bind_weights(model, layout, bound_plan, dtype, accumulate)
    return MergedModel(model, layout, plan, untied)


@dataclass
class DeferredModel:
    """A model built only when first needed (validation builds its reference after ONNX Runtime ran).

    `config` is available at once (validation sizes its cases from it); `build()` makes
    the module, so the graph's session and the PyTorch reference never coexist.
    """

    config: Any
    build: Callable[[], torch.nn.Module]
