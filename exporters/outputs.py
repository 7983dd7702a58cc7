"""Output folders: how every exporter's result appears on disk (atomically or not at all).

One module for the rules every output follows, whatever its format:

- `refuse_existing`: an output path that exists (an empty folder too) is refused before
  any work starts, and again just before the rename;
- `staged_output`: the output is built in a temporary folder *beside* the target (same
  file system, so the final rename is atomic), every file and the folder are fsynced,
  the folder is renamed into place, and the parent folder fsynced; any exception
  removes the temporary folder and leaves nothing at the target. The writer holds an
  flock on that folder, so the next run removes partial folders of killed writers
  (`remove_abandoned_partials`) and never a live one's; `replace_folder` swaps
  a complete new folder in for an existing one (batch re-runs);
- `copy_side_files`: the base's small files (config.json, tokenizer and generation
  files) travel with the output under ONE rule: the folder rule of
  `mora_core.checkpoint.member` (regular files, no symlink leaving the folder: such an
  entry is an error, not skipped), hidden files skipped, at most
  `SIDE_FILE_MAX_BYTES` each, and weights, weight indexes and pickles never copied. Each copy is hashed while written and `config.json` edits
  (dtype, untied embeddings) are applied on the way, so the digests are known without
  reading the output again. The base's model card (`README.md`) is never copied: it
  describes the base, not the merge (`exporters.card` writes the output's own). Sub-folders
  are copied only when the base's own files refer to them (`module_folders`:
  sentence-transformers' `modules.json` -> `1_Pooling/`, `2_Dense/`...), file by file
  under the same rule; a module's own `.safetensors` weights (a Dense layer: not
  merged into) are copied as they are, and a module whose weights are only a pickle is
  refused (the output would not load).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporters.errors import ExportError
from mora_core.checkpoint import CONFIG_NAME, is_weight_or_index, member, weight_kind
from mora_core.errors import MergeError
from mora_core.safe_io import open_regular, read_capped, read_json
from registry.copying import copy_hashing, fsync_dir
from registry.faults import fault_point
from registry.model_card import CARD_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

SIDE_FILE_MAX_BYTES = 64 << 20
MODULES_NAME = "modules.json"  # sentence-transformers: the model's modules and their sub-folders


def refuse_existing(out: Path) -> None:
    """`ExportError` if anything exists at `out`, an empty folder included.

    One rule for every output (merge folders, ONNX exports, pulled adapters): the path
    must be new. The output appears there in one rename when complete; an existing
    empty folder would have to be removed first (losing its owner, mode or mount), so
    it is refused like anything else.
    """
    out = Path(out)
    if out.is_symlink() or out.exists():
        raise ExportError(f"{out}: already exists (an empty folder too); give a new path: "
                          "the output appears there, complete, in one rename")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out` (atomic rename).

    The caller writes (and fsyncs) its files in the folder; this fsyncs the folder before
    the rename and the parent after it. On any exception the folder is removed.
    """
    out = Path(out)
    refuse_existing(out)
    remove_abandoned_partials(out)
    tmp = partial_path(out, os.getpid())
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, mode=0o700)  # private while written; the caller sets the final modes
    lock = _hold(tmp)  # held until the folder is renamed or removed: a live writer's mark
    try:
        yield tmp
        fault_point("output_written")
        fsync_dir(tmp)
        refuse_existing(out)  # someone may have created it meanwhile: never replace it
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


PARTIAL = ".partial-"


def partial_path(out: Path, pid: int) -> Path:
    """The folder process `pid` builds the output `out` in: `.<name>.partial-<pid>` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}{PARTIAL}{pid}"


def _hold(folder: Path) -> int:
    """Open `folder` and take an exclusive flock on it; returns the descriptor (close to release)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_abandoned_partials(out: Path) -> list[Path]:
    """Remove `.<name>.partial-*` folders beside `out` that no live writer holds (a killed merge
    leaves them: up to the whole output's size). A writer holds an flock on its folder for its
    whole life, so a folder whose lock can be taken belongs to a process that is gone."""
    out = Path(out)
    removed = []
    if fcntl is None or not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{glob.escape(out.name)}{PARTIAL}*"):
        if p.is_symlink() or not p.is_dir() or not (p.name[len(out.name) + 1 + len(PARTIAL):].isascii() and p.name[len(out.name) + 1 + len(PARTIAL):].isdigit()):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        finally:
            os.close(fd)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def fsync_file(path: Path) -> None:
    """Make a file written by someone else (e.g. torch's ONNX saver) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(new: Path, final: Path) -> None:
    """Replace the folder `final` by the complete folder `new` (a batch job re-run).

    Two renames on one file system: `final` steps aside, `new` takes its name (put back on
    failure), then the old folder is removed and the parent fsynced. A reader sees the old
    folder or the new one, or for an instant no folder, never a mix.
    """
    old = final.parent / f".{final.name}.replaced-{os.getpid()}"
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, data: bytes) -> str:
    """Write `data` to a new file, fsync it, and return its `sha256:<hex>` digest."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_json(path: Path, obj: Any) -> str:
    """`write_file` of `obj` as indented JSON with a final newline."""
    return write_file(path, (json.dumps(obj, indent=2) + "\n").encode())


def side_files(root: Path, skip: set[str] = frozenset()) -> list[str]:
    """Names of the files of `root` that travel with an output (sorted).

    Skipped: hidden files, weights and weight indexes, sub-folders, files over
    `SIDE_FILE_MAX_BYTES`. Refused (`MergeError` naming the file): any other entry that
    the folder rule refuses, i.e. a symbolic link leaving the folder (a tokenizer config
    pointing at /etc/shadow), a FIFO, a device. A hostile folder is an error, not a
    silently thinner output.
    """
    out = []
    for p in sorted(Path(root).iterdir()):
        name = p.name
        if name in skip or _never_copied(name):
            continue
        if p.is_dir() and not p.is_symlink():
            continue
        real = member(root, name)
        if real.stat().st_size > SIDE_FILE_MAX_BYTES:
            continue
        out.append(name)
    return out


def _never_copied(name: str) -> bool:
    """Hidden files, weights and weight indexes, and model cards."""
    return name.startswith(".") or is_weight_or_index(name) or name.lower() == CARD_NAME.lower()


def module_folders(root: Path) -> list[str]:
    """The sub-folders of `root` that its own files refer to, as relative posix paths.

    Today: the `path` of every module in sentence-transformers' `modules.json` (`""` is the
    root itself, the transformer). A module whose folder the base does not have (git keeps
    no empty folder: `2_Normalize/` of all-MiniLM-L6-v2) is left out. A path that is not
    a plain relative path inside `root` (absolute, `..`, a link leaving) is `MergeError`.
    """
    root = Path(root)
    if not (root / MODULES_NAME).exists() and not (root / MODULES_NAME).is_symlink():
        return []
    modules = read_json(member(root, MODULES_NAME), MergeError, SIDE_FILE_MAX_BYTES, what="modules.json")
    if not isinstance(modules, list):
        raise MergeError(f"{root / MODULES_NAME}: expected a list of modules")
    out: list[str] = []
    for m in modules:
        path = m.get("path") if isinstance(m, dict) else None
        if not isinstance(path, str):
            raise MergeError(f"{root / MODULES_NAME}: a module without a path: {str(m)[:80]}")
        rel = path.strip("/") if not path.startswith("/") else path
        if rel in ("", "."):
            continue
        parts = rel.split("/")
        if rel.startswith("/") or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
            raise MergeError(f"{root / MODULES_NAME}: module path {path!r} is not a folder inside {root}")
        folder = root / rel
        if not folder.exists() and not folder.is_symlink():
            continue
        real, real_root = folder.resolve(), root.resolve()
        if not folder.is_dir() or (real != real_root and real_root not in real.parents):
            raise MergeError(f"{folder}: module folder of {MODULES_NAME} is not a folder inside {root}; refused")
        if rel not in out:
            out.append(rel)
    return out


def _module_files(root: Path, sub: str) -> list[str]:
    """The files of module folder `sub` that travel with an output (relative to `root`).

    The side-file rule per file (`member`, nested); `.safetensors` weights are kept (the
    module's own, not merged into), other weights and pickles never; a module whose only
    weights are pickles is `MergeError`."""
    out: list[str] = []
    pickles: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root / sub):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}"
            kind = weight_kind(name)
            if name.startswith(".") or name.lower() == CARD_NAME.lower():
                continue
            real = member(root, rel, nested=True)  # links leaving the folder, FIFOs: an error
            if kind == "pickle":
                pickles.append(rel)
            elif kind == "safetensors" or (not is_weight_or_index(name)
                                           and real.stat().st_size <= SIDE_FILE_MAX_BYTES):
                out.append(rel)
    if pickles and not any(weight_kind(r) == "safetensors" for r in out):
        raise MergeError(f"{root / sub}: module weights only as a pickle ({pickles[0]}); refused "
                         "(save the module with safetensors)")
    return out


def copy_side_files(root: Path, dest: Path, config_edits: dict[str, Any] | None = None,
                    skip: set[str] = frozenset()) -> dict[str, str]:
    """Copy the side files of `root` into `dest` (fsynced), and the module folders its own
    files refer to (`module_folders`); returns {relative posix path: digest}.

    `config_edits` are set in the copied `config.json` (a key is only replaced if the
    base has it, except `torch_dtype` and `tie_word_embeddings`, which are always set).
    Everything to copy is listed (and refused) before the first byte is written.
    """
    root, dest = Path(root), Path(dest)
    names = side_files(root, skip)
    nested = [rel for sub in module_folders(root) for rel in _module_files(root, sub)]
    digests: dict[str, str] = {}
    for name in names:
        data = read_capped(member(root, name), SIDE_FILE_MAX_BYTES, MergeError, "side file")
        if name == CONFIG_NAME and config_edits:
            data = _edit_config(data, config_edits)
        digests[name] = write_file(dest / name, data)
    for rel in nested:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_regular(member(root, rel, nested=True), MergeError) as src, open(target, "xb", buffering=0) as dst:
            digests[rel] = copy_hashing(src, dst, None, sync=True)[0]
    for folder in sorted({(dest / rel).parent for rel in nested}, key=lambda p: -len(p.parts)):
        fsync_dir(folder)
    return digests


def _edit_config(data: bytes, edits: dict[str, Any]) -> bytes:
    try:
        cfg = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return data  # not ours to repair; the merge read it as config already if it mattered
    if not isinstance(cfg, dict):
        return data
    for key, value in edits.items():
        if key in ("torch_dtype", "tie_word_embeddings") or key in cfg:
            cfg[key] = value
    return (json.dumps(cfg, indent=2) + "\n").encode()
