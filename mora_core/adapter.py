"""Loading a PEFT adapter folder into validated, base-independent layers.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Loading checks
everything that can be checked without the base model: the config, the file's integrity,
finite values, that each LoRA module has both A and B with a shared rank, and that a MoRA
module's two on-disk copies (`lora_A.weight`, `lora_B.weight`, the same square matrix) are
identical. Shapes against the base are checked when layers are *bound* to base tensors
(`AdapterLayer.bind`), before a merge writes anything.

Pickle checkpoints (`adapter_model.bin`) are refused: loading one runs arbitrary code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mora_core.checkpoint import member, weight_kind
from mora_core.errors import AdapterError, MergeError
from mora_core.mora import MoraOperator, mora_rank
from mora_core.ops import DeltaOp, DoraOp, LoraEmbeddingOp, LoraOp, MoraOp
from mora_core.safetensors_io import SafetensorsFile, all_finite, dtype_code
from mora_core.spec import AdapterSpec, read_config
from mora_core.threads import kernel_threads, spare_one_core

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter weights are floating point; integer, bool and float8 tensors are refused by name
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "mag",
    ".lora_magnitude_vector.weight": "mag",
}


@dataclass
class AdapterLayer:
    """The tensors one adapter holds for one module, before it meets a base tensor."""

    module: str  # module path without the PEFT prefix, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "lora" | "lora_embedding" | "dora" | "mora"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def weight_name(self) -> str:
        return self.module + ".weight"

    @property
    def rank(self) -> int:
        """LoRA rank r, or MoRA's r_hat (the side of the square matrix)."""
        return int(self.tensors["A"].shape[0] if "A" in self.tensors else self.tensors["embA"].shape[0])

    def describe(self, spec: AdapterSpec) -> dict[str, Any]:
        if self.kind == "mora":
            return {"kind": "mora", "r": spec.rank_for(self.module), "r_hat": self.rank}
        a = self.tensors["A"] if "A" in self.tensors else self.tensors["embA"]
        b = self.tensors["B"] if "B" in self.tensors else self.tensors["embB"]
        d = {"kind": self.kind, "r": self.rank, "alpha": spec.alpha_for(self.module),
             "scaling": spec.lora_scaling(self.module)}
        if self.kind == "lora_embedding":
            d.update(num_embeddings=int(a.shape[1]), embedding_dim=int(b.shape[0]))
        else:
            d.update(in_features=int(a.shape[1]), out_features=int(b.shape[0]))
        return d

    def bind(self, target: str, shape: tuple[int, ...], spec: AdapterSpec, source: str) -> DeltaOp:
        """The delta op for base tensor `target` of stored `shape`; shape errors are `MergeError`."""
        if len(shape) != 2:
            raise MergeError(f"{source}: {self.module} targets {target} of shape {list(shape)}, not a matrix")
        where = f"{source}: {self.module} -> {target} {list(shape)}"
        fan_in_fan_out = spec.fan_in_fan_out
        out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else shape
        if self.kind == "mora":
            m = self.tensors["A"]
            r = spec.rank_for(self.module)
            expected = mora_rank(in_f, out_f, r, spec.mora_type or 1)
            if m.shape[0] != expected:
                raise MergeError(
                    f"{where}: MoRA matrix is {m.shape[0]}x{m.shape[0]} but r={r}, type {spec.mora_type} "
                    f"on a {in_f}->{out_f} layer needs r_hat={expected}")
            op = MoraOperator(in_f, out_f, expected, spec.mora_type or 1)
            return MoraOp(target, shape, source, m=m, operator=op, fan_in_fan_out=fan_in_fan_out)
        if self.kind == "lora_embedding":
            a, b = self.tensors["embA"], self.tensors["embB"]
            if tuple(shape) != (a.shape[1], b.shape[0]):
                raise MergeError(f"{where}: embedding LoRA needs [{a.shape[1]}, {b.shape[0]}]")
            return LoraEmbeddingOp(target, shape, source, a=a, b=b, scaling=spec.lora_scaling(self.module))
        a, b = self.tensors["A"], self.tensors["B"]
        if (b.shape[0], a.shape[1]) != (out_f, in_f):
            hint = " (fan_in_fan_out is set: the base is read as [in, out])" if fan_in_fan_out else ""
            raise MergeError(f"{where}: LoRA B@A is [{b.shape[0]}, {a.shape[1]}], does not fit{hint}")
        scaling = spec.lora_scaling(self.module)
        if self.kind == "dora":
            mag = self.tensors["mag"].reshape(-1)
            if mag.shape[0] != out_f:
                raise MergeError(f"{where}: DoRA magnitude has {mag.shape[0]} entries, layer has {out_f} outputs")
            return DoraOp(target, shape, source, a=a, b=b, scaling=scaling, magnitude=mag,
                          fan_in_fan_out=fan_in_fan_out)
        return LoraOp(target, shape, source, a=a, b=b, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


@dataclass
class Adapter:
    """A loaded, validated adapter: its spec, its per-module layers, its full tensors."""

    path: Path | None
    config: dict[str, Any]
    spec: AdapterSpec
    layers: dict[str, AdapterLayer]
    replacements: dict[str, torch.Tensor]  # base tensor name -> full value
    label: str

    @property
    def kind(self) -> str:
        return self.spec.kind

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description (what the registry records for a version)."""
        spec = self.spec
        return {
            "kind": spec.kind,
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "use_rslora": spec.use_rslora,
            "use_dora": spec.use_dora,
            "fan_in_fan_out": spec.fan_in_fan_out,
            "mora_type": spec.mora_type,
            "r_hat_rule": ("int(sqrt((in+out)*r)+0.5)" + (", rounded down to even" if spec.mora_type == 6 else ""))
            if spec.kind == "mora" else None,
            "target_modules": spec.target_modules,
            "rank_pattern": spec.rank_pattern,
            "alpha_pattern": spec.alpha_pattern,
            "bias": spec.bias,
            "modules_to_save": spec.modules_to_save,
            "modules": {name: layer.describe(spec) for name, layer in sorted(self.layers.items())},
            "replaced_tensors": sorted(self.replacements),
            "parameters": sum(int(t.numel()) for layer in self.layers.values() for k, t in layer.tensors.items()
                              if not (layer.kind == "mora" and k == "B"))
            + sum(int(t.numel()) for t in self.replacements.values()),
        }


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _classify(key: str) -> tuple[str, str] | None:
    """(module path, role) for an adapter tensor key, or None for a full tensor."""
    for suffix, role in _LORA_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def load_adapter(path: str | Path, label: str | None = None) -> Adapter:
    """Read and validate a PEFT adapter folder (LoRA, DoRA, rsLoRA or MoRA).

    Raises `AdapterError` with one line naming the file and the problem.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not an adapter folder (no such directory)")
    config_path = folder / CONFIG_NAME
    if not config_path.exists() and not config_path.is_symlink():
        raise AdapterError(f"{config_path}: not found (an adapter folder needs adapter_config.json)")
    member(folder, CONFIG_NAME, AdapterError)  # the folder rule: no link out, no FIFO
    config, spec = read_config(config_path)
    weights = folder / WEIGHTS_NAME
    if not weights.exists() and not weights.is_symlink():
        pickles = sorted(p.name for p in folder.glob("adapter_model.*") if weight_kind(p.name) == "pickle")
        if pickles:
            raise AdapterError(
                f"{folder / pickles[0]}: pickle checkpoints are refused (they can run code); "
                "convert it to adapter_model.safetensors first")
        raise AdapterError(f"{weights}: not found")
    member(folder, WEIGHTS_NAME, AdapterError)
    tensors = SafetensorsFile(weights, AdapterError).map_all()
    return adapter_from_tensors(tensors, config, spec, folder, label or folder.name, where=str(weights))


def adapter_from_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], spec: AdapterSpec,
                         path: Path | None, label: str, where: str) -> Adapter:
    """Build an `Adapter` from already-read tensors (validates exactly like `load_adapter`).

    The checks run one small kernel per matrix, on all CPUs but one (`mora_core.threads`).
    """
    with kernel_threads(spare_one_core()):
        return _build_adapter(tensors, config, spec, path, label, where)


def _build_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any], spec: AdapterSpec,
                   path: Path | None, label: str, where: str) -> Adapter:
    if not tensors:
        raise AdapterError(f"{where}: holds no tensors")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if t.dtype not in WEIGHT_DTYPES:
            raise AdapterError(f"{where}: tensor {key} is {dtype_code(t.dtype)}; adapter weights must be "
                               "F16, BF16, F32 or F64 (float16, bfloat16, float32, float64)")
        if not all_finite(t):
            raise AdapterError(f"{where}: tensor {key} holds NaN or Inf values")
        name = _strip_prefix(key)
        if ".lora_B.bias" in name or name.endswith(".lora_A.bias"):
            raise AdapterError(f"{where}: {key}: biases on LoRA matrices (lora_bias) are not supported")
        cls = _classify(name)
        if cls is None:
            if "lora_" in name:
                raise AdapterError(f"{where}: {key} is not a LoRA/MoRA tensor this tool understands")
            # full tensors: modules_to_save, trained biases, saved embedding layers
            replacements[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = t
            continue
        module, role = cls
        grouped.setdefault(module, {})[role] = t
    layers = {m: _make_layer(m, parts, spec, where) for m, parts in grouped.items()}
    _check_targets(layers, spec, where)
    return Adapter(path=path, config=config, spec=spec, layers=layers, replacements=replacements, label=label)


def _make_layer(module: str, parts: dict[str, torch.Tensor], spec: AdapterSpec, where: str) -> AdapterLayer:
    def need(*roles: str) -> None:
        missing = [r for r in roles if r not in parts]
        if missing:
            names = {"A": "lora_A.weight", "B": "lora_B.weight", "embA": "lora_embedding_A",
                     "embB": "lora_embedding_B", "mag": "lora_magnitude_vector"}
            raise AdapterError(f"{where}: module {module} has no {', '.join(names[m] for m in missing)}")

    if "embA" in parts or "embB" in parts:
        need("embA", "embB")
        a, b = parts["embA"], parts["embB"]
        if spec.kind == "mora":
            raise AdapterError(f"{where}: module {module}: MoRA on embedding layers is not defined")
        if "mag" in parts:
            raise AdapterError(f"{where}: module {module}: DoRA on embedding layers is not supported")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: module {module}: lora_embedding_A {list(a.shape)} and "
                               f"lora_embedding_B {list(b.shape)} do not share a rank")
        _check_rank(module, a.shape[0], spec, where)
        return AdapterLayer(module, "lora_embedding", {"embA": a, "embB": b})
    need("A", "B")
    a, b = parts["A"], parts["B"]
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(f"{where}: module {module}: lora_A/lora_B must be matrices, got "
                           f"{list(a.shape)} and {list(b.shape)}")
    if spec.kind == "mora":
        if a.shape[0] != a.shape[1]:
            raise AdapterError(f"{where}: module {module}: MoRA matrix must be square, got {list(a.shape)}")
        if a.shape != b.shape or not torch.equal(a, b):
            raise AdapterError(f"{where}: module {module}: MoRA's two copies (lora_A.weight, lora_B.weight) differ")
        if spec.mora_type == 6 and a.shape[0] % 2:
            raise AdapterError(f"{where}: module {module}: MoRA type 6 needs an even r_hat, got {a.shape[0]}")
        return AdapterLayer(module, "mora", {"A": a, "B": b})
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                           "do not share a rank")
    _check_rank(module, a.shape[0], spec, where)
    if "mag" in parts:
        if not spec.use_dora:
            raise AdapterError(f"{where}: module {module} has a DoRA magnitude but use_dora is false")
        return AdapterLayer(module, "dora", {"A": a, "B": b, "mag": parts["mag"]})
    if spec.use_dora:
        raise AdapterError(f"{where}: module {module} has no lora_magnitude_vector but use_dora is true")
    return AdapterLayer(module, "lora", {"A": a, "B": b})


def _check_targets(layers: dict[str, AdapterLayer], spec: AdapterSpec, where: str) -> None:
    """Every LoRA/MoRA module must be one that `target_modules` selects (PEFT created only those)."""
    stray = [m for m in sorted(layers) if not spec.targets(m)]
    if stray:
        shown = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules or [])
        raise AdapterError(f"{where}: module {stray[0]}" + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
                           + f" is not selected by target_modules {str(shown)[:120]} in {spec.source}; "
                           "config and weights do not belong together")


def _check_rank(module: str, r: int, spec: AdapterSpec, where: str) -> None:
    want = spec.rank_for(module)
    if r != want:
        raise AdapterError(f"{where}: module {module} has rank {r} but the config (r / rank_pattern) says {want}")
