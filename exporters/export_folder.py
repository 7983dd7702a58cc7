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


def read_member_json(folder: Path, name: str, what: str, error_cls: type[ExportError] = ExportError) -> Any:
    """`folder/name` under the folder rule and the strict JSON reader (`error_cls` otherwise)."""
    from mora_core.checkpoint import member
    from mora_core.safe_io import read_json

    return read_json(member(folder, name, error_cls), error_cls, what=what)


def read_json_object(folder: Path, name: str, what: str,
                     error_cls: type[ExportError] = ExportError) -> dict[str, Any] | None:
    """A JSON object file of the folder, None when absent; anything but an object is an error."""
    if not present(folder, name):
        return None
    loaded = read_member_json(folder, name, what, error_cls)
    if not isinstance(loaded, dict):
        raise error_cls(f"{Path(folder) / name}: not a JSON object")
    return loaded


def check_folder(folder: Path, error_cls: type[ExportError] = ExportError) -> None:
    """Every file of `folder` obeys the folder rule (before handing the whole folder to a runtime
    that opens files by itself, such as onnxruntime-genai: config, graph, tokenizer files)."""
    from mora_core.checkpoint import member

    for entry in sorted(Path(folder).iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            member(folder, entry.name, error_cls)


def positive_int(value: Any, where: str, error_cls: type[ExportError] = ExportError) -> int:
    """`value` if it is a positive JSON integer, else `error_cls` naming `where`."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value >= 2**63:
        raise error_cls(f"{where}: {str(value)[:40]!r} is not a positive integer")
    return value


def graph_and_recipe(model: Path, error_cls: type[ExportError] = ExportError) -> tuple[Path, dict[str, Any]]:
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
            raise error_cls(f"{model}: no {GRAPH_NAME} here (give an `adapters merge --to onnx` output folder)")
    else:
        raise error_cls(f"{model}: no such folder (give an `adapters merge --to onnx` output folder)")
    graph = member(folder, name, error_cls)
    if present(folder, DATA_NAME):
        member(folder, DATA_NAME, error_cls)
    recipe = read_json_object(folder, RECIPE_NAME, "export recipe", error_cls) or {}
    return graph, recipe


def config_vocab_size(folder: Path, error_cls: type[ExportError] = ExportError) -> int | None:
    """config.json's `vocab_size` (a positive integer), None when there is no config.json or key."""
    cfg = read_json_object(folder, "config.json", "model config", error_cls)
    if cfg is None or cfg.get("vocab_size") is None:
        return None
    return positive_int(cfg["vocab_size"], f"{Path(folder) / 'config.json'}: vocab_size", error_cls)
