"""What an adapter *is*, read from a PEFT `adapter_config.json`.

Two dialects share the file: upstream PEFT's LoRA (with rsLoRA, DoRA, rank/alpha patterns,
`fan_in_fan_out` for GPT-2's Conv1D) and the MoRA fork published with the paper, which adds
`use_mora` and `mora_type`. Upstream PEFT drops those two keys silently and would read a
MoRA folder as LoRA; here they decide the kind. Anything that is not LoRA/MoRA is refused
by name rather than skipped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mora_core.errors import AdapterError
from mora_core.mora import MORA_TYPES

SUPPORTED_PEFT_TYPES = ("LORA",)


def match_pattern(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's pattern lookup: exact key first, then a regex matching the module path's end."""
    if module in patterns:
        return module
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter-wide settings; per-module rank and alpha come from `rank_for`/`alpha_for`."""

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

    def rank_for(self, module: str) -> int:
        key = match_pattern(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = match_pattern(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def lora_scaling(self, module: str) -> float:
        """PEFT's scaling: `alpha / r`, or rsLoRA's `alpha / sqrt(r)`."""
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def parse_config(cfg: Any, path: Path) -> AdapterSpec:
    """Validate a parsed adapter_config.json and turn it into an `AdapterSpec`."""
    if not isinstance(cfg, dict):
        raise _fail(path, "is not a JSON object")
    peft_type = str(cfg.get("peft_type") or "").upper()
    if not peft_type:
        raise _fail(path, "has no peft_type (is this a PEFT adapter config?)")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise _fail(path, f"peft_type {peft_type} is not supported (only LoRA and MoRA adapters)")
    r = _typed(cfg, "r", int, None, path)
    if r is None or r < 1:
        raise _fail(path, f"r must be a positive integer, got {cfg.get('r')!r}")
    alpha = _typed(cfg, "lora_alpha", (int, float), r, path)
    use_mora = bool(cfg.get("use_mora", False))
    mora_type = None
    if use_mora:
        mora_type = _typed(cfg, "mora_type", int, 1, path)
        if mora_type not in MORA_TYPES:
            raise _fail(path, f"mora_type {mora_type} is not one of {list(MORA_TYPES)}")
        if cfg.get("use_dora"):
            raise _fail(path, "use_mora and use_dora together are not a defined adapter")
    if cfg.get("lora_bias"):
        raise _fail(path, "lora_bias=true (a bias on lora_B) is not supported")
    rank_pattern = _typed(cfg, "rank_pattern", dict, {}, path)
    alpha_pattern = _typed(cfg, "alpha_pattern", dict, {}, path)
    for k, v in rank_pattern.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _fail(path, f"rank_pattern[{k!r}] must be a positive integer, got {v!r}")
    bias = _typed(cfg, "bias", str, "none", path)
    if bias not in ("none", "all", "lora_only"):
        raise _fail(path, f"bias must be none, all or lora_only, got {bias!r}")
    return AdapterSpec(
        kind="mora" if use_mora else "lora",
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        mora_type=mora_type,
        target_modules=cfg.get("target_modules"),
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        bias=bias,
        modules_to_save=cfg.get("modules_to_save"),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )


def read_config(path: Path) -> tuple[dict[str, Any], AdapterSpec]:
    """Read and validate `adapter_config.json`; returns the raw dict and the spec."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(path, "not found (an adapter folder needs adapter_config.json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot be read ({exc})") from None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return cfg, parse_config(cfg, path)
