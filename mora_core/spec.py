"""What an adapter *is*, read from a PEFT `adapter_config.json`.

Two dialects share the file: upstream PEFT's LoRA (with rsLoRA, DoRA, rank/alpha patterns,
`fan_in_fan_out` for GPT-2's Conv1D) and the MoRA fork published with the paper, which adds
`use_mora` and `mora_type`. Upstream PEFT drops those two keys silently and would read a
MoRA folder as LoRA; here they decide the kind. Anything that is not LoRA/MoRA is refused
by name rather than skipped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mora_core.errors import AdapterError
from mora_core.mora import MORA_TYPES
from mora_core.patterns import Matcher, PatternError, check_key
from mora_core.safe_io import read_json

SUPPORTED_PEFT_TYPES = ("LORA",)


MAX_RANK = 1 << 20  # r and rank_pattern values: a LoRA rank above a million is not an adapter


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter-wide settings; per-module rank and alpha come from `rank_for`/`alpha_for`.

    Pattern lookups (`rank_pattern`, `alpha_pattern`, `target_modules`) go through one
    `Matcher` per spec: PEFT's semantics, one shared time budget (see mora_core.patterns).
    A pattern that exhausts it raises `AdapterError` naming `source` (the config file).
    """

    kind: str  # "lora" | "mora"
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    mora_type: int | None = None
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    source: str = field(default="adapter_config.json", compare=False, repr=False)
    matcher: Matcher = field(default_factory=Matcher, compare=False, repr=False)

    def _lookup(self, table: str, module: str) -> str | None:
        try:
            return self.matcher.lookup(getattr(self, table), module)
        except PatternError as exc:
            raise AdapterError(f"{self.source}: {table} key {exc}") from None

    def rank_for(self, module: str) -> int:
        key = self._lookup("rank_pattern", module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = self._lookup("alpha_pattern", module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def lora_scaling(self, module: str) -> float:
        """PEFT's scaling: `alpha / r`, or rsLoRA's `alpha / sqrt(r)`."""
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether `target_modules` selects `module` (True when the config leaves it open)."""
        t = self.target_modules
        if t is None or t == "all-linear" or (not isinstance(t, str) and not t):
            return True
        try:
            return self.matcher.targeted(t, module)
        except PatternError as exc:
            raise AdapterError(f"{self.source}: target_modules {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.compare}


def _fail(path: Path, what: str) -> AdapterError:
    return AdapterError(f"{path}: {what}")


def _typed(cfg: dict, key: str, kind: type | tuple[type, ...], default: Any, path: Path) -> Any:
    value = cfg.get(key, default)
    if value is None:
        return default
    if kind in (int, float) and isinstance(value, bool):
        raise _fail(path, f"{key} must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise _fail(path, f"{key} has the wrong type ({type(value).__name__}: {value!r})")
    return value


def _flag(cfg: dict, key: str, path: Path) -> bool:
    value = cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _fail(path, f"{key} must be true or false, got {value!r}")
    return value


def _finite(value: Any, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"{what} must be a finite number, got {value!r}")
    return float(value)


def _patterns(cfg: dict, key: str, path: Path) -> dict[str, Any]:
    table = _typed(cfg, key, dict, {}, path)
    for k in table:
        try:
            check_key(k)
        except PatternError as exc:
            raise _fail(path, f"{key} key {exc}") from None
    return dict(table)


def _names(cfg: dict, key: str, path: Path) -> list[str] | str | None:
    value = cfg.get(key)
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"{key} must be a list of module names or a regex, got {str(value)[:80]}")
    return value


def parse_config(cfg: Any, path: Path) -> AdapterSpec:
    """Validate a parsed adapter_config.json and turn it into an `AdapterSpec`."""
    if not isinstance(cfg, dict):
        raise _fail(path, "is not a JSON object")
    peft_type = cfg.get("peft_type") or ""
    if not isinstance(peft_type, str) or not peft_type:
        raise _fail(path, "has no peft_type (is this a PEFT adapter config?)")
    peft_type = peft_type.upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise _fail(path, f"peft_type {peft_type[:40]} is not supported (only LoRA and MoRA adapters)")
    r = _typed(cfg, "r", int, None, path)
    if r is None or not 1 <= r <= MAX_RANK:
        raise _fail(path, f"r must be an integer from 1 to {MAX_RANK}, got {cfg.get('r')!r}")
    alpha = _finite(_typed(cfg, "lora_alpha", (int, float), r, path), "lora_alpha", path)
    use_mora = _flag(cfg, "use_mora", path)
    mora_type = None
    if use_mora:
        mora_type = _typed(cfg, "mora_type", int, 1, path)
        if mora_type not in MORA_TYPES:
            raise _fail(path, f"mora_type {mora_type} is not one of {list(MORA_TYPES)}")
        if cfg.get("use_dora"):
            raise _fail(path, "use_mora and use_dora together are not a defined adapter")
    if cfg.get("lora_bias"):
        raise _fail(path, "lora_bias=true (a bias on lora_B) is not supported")
    rank_pattern = _patterns(cfg, "rank_pattern", path)
    alpha_pattern = _patterns(cfg, "alpha_pattern", path)
    for k, v in rank_pattern.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_RANK:
            raise _fail(path, f"rank_pattern[{k!r}] must be an integer from 1 to {MAX_RANK}, got {v!r}")
    alphas = {k: _finite(v, f"alpha_pattern[{k!r}]", path) for k, v in alpha_pattern.items()}
    bias = _typed(cfg, "bias", str, "none", path)
    if bias not in ("none", "all", "lora_only"):
        raise _fail(path, f"bias must be none, all or lora_only, got {bias!r}")
    target_modules = _names(cfg, "target_modules", path)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            check_key(target_modules, whole=True)
        except PatternError as exc:
            raise _fail(path, f"target_modules {exc}") from None
    base_name = cfg.get("base_model_name_or_path")
    return AdapterSpec(
        kind="mora" if use_mora else "lora",
        r=r,
        lora_alpha=alpha,
        use_rslora=_flag(cfg, "use_rslora", path),
        use_dora=_flag(cfg, "use_dora", path),
        fan_in_fan_out=_flag(cfg, "fan_in_fan_out", path),
        mora_type=mora_type,
        target_modules=target_modules,
        rank_pattern=rank_pattern,
        alpha_pattern=alphas,
        bias=bias,
        modules_to_save=_names(cfg, "modules_to_save", path),
        base_model_name_or_path=base_name if isinstance(base_name, str) else None,
        source=str(path),
    )


def read_config(path: Path) -> tuple[dict[str, Any], AdapterSpec]:
    """Read and validate `adapter_config.json` (the strict JSON reader); the raw dict and the spec."""
    if not path.exists() and not path.is_symlink():
        raise _fail(path, "not found (an adapter folder needs adapter_config.json)")
    cfg = read_json(path, AdapterError, what="adapter config")
    return cfg, parse_config(cfg, path)
