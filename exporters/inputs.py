"""Adapter arguments of `adapters merge`, and registering what it produced.

An argument is a local PEFT folder when such a folder exists, otherwise a registry
reference, materialised (digest-verified) from the store. A reference pushed with
`--base` recorded its base weight digests; merging onto a different base is refused
unless the user allows it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.errors import ExportError
from mora_core.adapter import Adapter, load_adapter
from mora_core.errors import MergeError
from registry.blobs import hash_file


@dataclass
class ResolvedAdapter:
    arg: str
    adapter: Adapter
    ref: str  # registry reference ("name:3") or the folder path
    version: Any | None  # registry VersionInfo when it came from the store

    def describe(self, weight: float) -> dict[str, Any]:
        return {"ref": self.ref, "weight": weight, "kind": self.adapter.kind,
                "from": "registry" if self.version is not None else "folder"}


def resolve_adapters(args: Sequence[str], base_dir: Path, registry: Callable[[], Any],
                     allow_base_mismatch: bool) -> list[ResolvedAdapter]:
    """Load each argument: a folder as it is, a reference through `registry()` (opened on demand)."""
    out: list[ResolvedAdapter] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            out.append(ResolvedAdapter(arg, load_adapter(path), str(path), None))
            continue
        version = _resolve(registry, arg, path)
        mismatches = registry().check_base(version.ref, base_dir)
        if mismatches and not allow_base_mismatch:
            raise MergeError(f"{version.ref} was pushed for another base than {base_dir}: {mismatches[0]} "
                             "(use --allow-base-mismatch to merge anyway)")
        folder = registry().materialize(version.ref)
        out.append(ResolvedAdapter(arg, load_adapter(folder, label=version.ref), version.ref, version))
    return out


def _resolve(registry: Callable[[], Any], arg: str, path: Path) -> Any:
    """The registry version `arg` names; a mistyped folder is reported as one, not as a bad name."""
    from registry.errors import RegistryError
    from registry.names import parse_ref

    if path.exists():
        raise ExportError(f"{arg}: not an adapter folder (it is a file)")
    looks_like_path = arg.startswith((".", "/", "~")) or os.sep in arg and not _is_ref(parse_ref, arg)
    if looks_like_path or not _is_ref(parse_ref, arg):
        raise ExportError(f"{arg}: no such adapter folder (and not a registry reference)")
    try:
        return registry().resolve(arg)
    except RegistryError as exc:
        if str(exc).startswith("unknown adapter"):
            raise ExportError(f"{arg}: no such adapter folder, and {exc} in the registry") from None
        raise


def _is_ref(parse_ref: Callable[[str], Any], arg: str) -> bool:
    try:
        parse_ref(arg)
    except ValueError:
        return False
    return True


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("adapter-registry", "torch", "safetensors", "transformers", "onnx", "onnxruntime-gpu",
                "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def register_output(registry: Any, kind: str, out_dir: Path, base_dir: Path,
                    resolved: list[ResolvedAdapter], weights: list[float], dtype: str, accumulate: str,
                    summary: dict[str, Any], hub: dict[str, str] | None = None) -> dict[str, Any]:
    """Record the output as an artifact whose lineage points at every input version.

    `hub` ({"repo", "commit"}) names the base when it was resolved from the Hugging Face Hub.
    """
    from mora_core.checkpoint import open_checkpoint

    base = open_checkpoint(base_dir)
    cfg = base.config
    recipe = {
        "kind": kind,
        "base": {
            "path": str(Path(base_dir).resolve()),
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
            "name_or_path": cfg.get("_name_or_path"),
            "files": {f.path.name: hash_file(f.path)[0] for f in base.files},
            **({"hub": hub} if hub else {}),
        },
        "adapters": [{**r.describe(w), "folder_digest": _folder_digest(r.adapter)} for r, w in zip(resolved, weights)],
        "dtype": dtype,
        "accumulate": accumulate,
        "tools": tool_versions(),
    }
    for key in ("opset", "untied", "export"):
        if key in summary:
            recipe[key] = summary[key]
    inputs = [(r.ref, w) for r, w in zip(resolved, weights) if r.version is not None]
    info = registry.register_artifact(kind=kind, path=out_dir, recipe=recipe, inputs=inputs,
                                      report=summary.get("validation"))
    return info.to_dict()


def _folder_digest(adapter: Adapter) -> str | None:
    if adapter.path is None:
        return None
    p = Path(adapter.path) / "adapter_model.safetensors"
    return hash_file(p)[0] if p.is_file() else None
