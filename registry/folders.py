"""What a push reads from disk: the adapter folder's files, its spec, the base weight files
(hashed through the store's digest cache, `registry.file_digests`).

The spec comes from `mora_core.adapter.load_adapter` (which validates everything that
can be checked without the base model). It imports torch, so it is imported here
lazily, only on the push path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from registry.errors import RegistryError

# which kinds of mora_core.checkpoint.WEIGHT_SUFFIXES (the one suffix table) make up a base's identity
BASE_IDENTITY_KINDS = frozenset({"safetensors", "pickle", "gguf", "onnx"})
MAX_FILES = 64


def adapter_files(folder: Path) -> list[Path]:
    """The regular files at the top of an adapter folder, sorted; pickles are refused."""
    from mora_core.checkpoint import weight_kind  # the one suffix table (no torch)

    if not folder.is_dir():
        raise RegistryError(f"{folder}: not an adapter folder (no such directory)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for p in files:
        if weight_kind(p.name) == "pickle":
            raise RegistryError(f"{p}: pickle checkpoints are refused (they can run code); "
                                "convert it to adapter_model.safetensors first")
        if p.is_symlink():
            raise RegistryError(f"{p}: symbolic links are not pushed; copy the file into the folder")
    names = {p.name for p in files}
    if "adapter_config.json" not in names:
        raise RegistryError(f"{folder / 'adapter_config.json'}: not found "
                            "(an adapter folder needs adapter_config.json)")
    if "adapter_model.safetensors" not in names:
        raise RegistryError(f"{folder / 'adapter_model.safetensors'}: not found")
    if len(files) > MAX_FILES:
        raise RegistryError(f"{folder}: {len(files)} files; an adapter folder holds at most {MAX_FILES}")
    return files


def inspect_adapter(folder: Path) -> dict[str, Any]:
    """Validate the folder with mora_core and return its spec summary (kind, r, modules...)."""
    from mora_core.adapter import load_adapter
    from mora_core.errors import MoraCoreError

    try:
        adapter = load_adapter(folder)
    except MoraCoreError as exc:
        raise RegistryError(str(exc)) from None
    return adapter.summary()


def check_fits_base(folder: Path, base_dir: str | Path) -> None:
    """Refuse a push whose adapter cannot be merged into the base given with `--base`.

    The same check a merge makes before writing (every module resolves to one base
    tensor of a fitting shape), made at push time: recorded digests of a base the
    adapter cannot fit would later make every merge suggest `--allow-base-mismatch`,
    which cannot help.
    """
    from mora_core.adapter import load_adapter
    from mora_core.checkpoint import open_checkpoint
    from mora_core.errors import MoraCoreError
    from mora_core.plan import build_plan

    try:
        base = open_checkpoint(base_dir)
        build_plan(base.shapes, [load_adapter(folder)], [1.0], base.tied)
    except MoraCoreError as exc:
        raise RegistryError(f"--base {base_dir}: the adapter does not fit this base model ({exc})") from None


def base_weight_files(base_dir: str | Path) -> list[Path]:
    """The weight files at the top of a base model folder, sorted (what a base digest covers)."""
    from mora_core.checkpoint import weight_kind  # the one suffix table (no torch)

    base = Path(base_dir)
    if not base.is_dir():
        raise RegistryError(f"{base}: base model folder not found")
    files = sorted(p for p in base.iterdir() if p.is_file() and weight_kind(p.name) in BASE_IDENTITY_KINDS)
    if not files:
        raise RegistryError(f"{base}: no weight files (*.safetensors, *.bin) found")
    return files


def compare_base(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """Human-readable differences between two {file: digest} maps (empty = same base)."""
    out = []
    for f in sorted(set(recorded) | set(current)):
        if f not in current:
            out.append(f"{f}: recorded at push but absent from the given base")
        elif f not in recorded:
            out.append(f"{f}: present in the given base but not recorded at push")
        elif recorded[f] != current[f]:
            out.append(f"{f}: digest {current[f][:19]}... differs from {recorded[f][:19]}... recorded at push")
    return out


def check_base(recorded: dict[str, str] | None, base_dir: str | Path,
               digests: Callable[[list[Path]], dict[str, str]]) -> list[str]:
    """Differences between the base digests recorded at push and `base_dir`, hashed with
    `digests` (the store's cached `file_digests`); nothing recorded: [] and nothing read."""
    if not recorded:
        return []
    return compare_base(recorded, digests(base_weight_files(base_dir)))
