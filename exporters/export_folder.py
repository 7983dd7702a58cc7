"""Reading an ONNX export folder for serving (`adapters run`, `adapters generate`), no torch.

Every file is read under the folder rule (`mora_core.checkpoint.member`: a regular file
inside the folder, no symbolic link leaving it, no FIFO) and every JSON file by the
strict reader (`mora_core.safe_io.read_json`: size cap, depth cap, unique keys). A
folder that breaks a rule is an `ExportError` naming the file (one line, exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporters.errors import ExportError
from exporters.onnx_layout import DATA_NAME, GRAPH_NAME, RECIPE_NAME


def present(folder: Path, name: str) -> bool:
    """`folder/name` exists as anything (a dangling or escaping link too: the rule judges it)."""
    path = Path(folder) / name
    return path.exists() or path.is_symlink()


def read_member_json(folder: Path, name: str, what: str) -> Any:
    """`folder/name` under the folder rule and the strict JSON reader (`ExportError` otherwise)."""
    from mora_core.checkpoint import member
    from mora_core.safe_io import read_json

    return read_json(member(folder, name, ExportError), ExportError, what=what)


def read_json_object(folder: Path, name: str, what: str) -> dict[str, Any] | None:
    """A JSON object file of the folder, None when absent; anything but an object is an error."""
    if not present(folder, name):
        return None
    loaded = read_member_json(folder, name, what)
    if not isinstance(loaded, dict):
        raise ExportError(f"{Path(folder) / name}: not a JSON object")
    return loaded


def graph_and_recipe(model: Path) -> tuple[Path, dict[str, Any]]:
    """The graph to load and the export's recipe (`{}` when absent), read under the folder rule.

    `model` is an export folder (or a `.onnx` file in one). The graph, its external data
    and `export.json` are read only if they are regular files inside that folder.
    """
    from mora_core.checkpoint import member

    model = Path(model)
    if model.suffix == ".onnx" and not model.is_dir():
        folder, name = model.parent, model.name
    elif model.is_dir():
        folder, name = model, GRAPH_NAME
        if not present(folder, name):
            raise ExportError(f"{model}: no {GRAPH_NAME} here (give an `adapters merge --to onnx` output folder)")
    else:
        raise ExportError(f"{model}: no such folder (give an `adapters merge --to onnx` output folder)")
    graph = member(folder, name, ExportError)
    if present(folder, DATA_NAME):
        member(folder, DATA_NAME, ExportError)
    recipe = read_json_object(folder, RECIPE_NAME, "export recipe") or {}
    return graph, recipe


def config_vocab_size(folder: Path) -> int | None:
    """config.json's `vocab_size` (a positive integer), None when there is no config.json or key."""
    cfg = read_json_object(folder, "config.json", "model config")
    if cfg is None or cfg.get("vocab_size") is None:
        return None
    n = cfg["vocab_size"]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ExportError(f"{Path(folder) / 'config.json'}: vocab_size {n!r} is not a positive integer")
    return n
