"""The recipe of a merge output and its registration as an artifact: every byte read once.

A recipe says how an output was made (base identity and file digests, adapters and
weights, dtype, accumulation, tool versions, and the exporter's own facts), enough to
make it again and to check it. Registration records it with lineage edges from every
registry version that went in.

Nothing here reads a weight file:
- the output's digests were taken while its files were written (the shard writer, the
  side-file copier, the ONNX recipe) and are passed to `register_artifact(files=...)`;
- the base's digests come from `Registry.file_digests`, a cache keyed by file identity
  (path, size, mtime_ns, inode): the first merge of a base hashes it once, later merges
  of the same unchanged files hash nothing. `BaseDigests` hashes what the cache does not
  answer in a thread, so that a first merge overlaps it (hashlib releases the GIL).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mora_core.adapter import Adapter
    from mora_core.checkpoint import Checkpoint
    from registry.file_digests import PendingDigests

TOOL_PACKAGES = ("adapter-registry", "torch", "safetensors", "transformers", "onnx", "onnxruntime-gpu",
                 "onnxruntime", "onnxscript")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def tool_versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape an output (a fresh dict each call)."""
    return dict(_tool_versions())


@functools.lru_cache(maxsize=1)
def _tool_versions() -> tuple[tuple[str, str], ...]:
    """Read once per process: each metadata lookup scans the import path (~35 ms for all of
    them here, paid twice per merge before: by the model card and by the record)."""
    from importlib.metadata import PackageNotFoundError, version

    out = [("python", platform.python_version())]
    for pkg in TOOL_PACKAGES:
        try:
            out.append((pkg, version(pkg)))
        except PackageNotFoundError:
            continue
    return tuple(out)


class AdapterDigests:
    """Each adapter's weights digest (`adapter_digest`), found once per job in a background
    thread that runs beside the merge, which `result()` joins.

    Why: the model card and the recorded recipe both name these digests. Each used to find
    them on its own, on the merge's serial tail after the last shard: the card hashed every
    adapter file, and the record asked the store again, which hashed it a second time when
    its cache did not know the file. Now a folder's file is hashed at most once: through
    the store's file-digest cache when `registry` is given (a merge through
    `registry.worker` hashes it in that process), else here (hashlib releases the GIL).
    The thread also reads `tool_versions` once and imports the card's renderer
    (`registry.model_card.load_renderer`), so the card finds both ready.
    """

    def __init__(self, registry: Any | None, resolved: Sequence[Any]):
        self._registry, self._resolved = registry, list(resolved)
        self._digests: list[str | None] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="adapter-digests", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from registry.model_card import load_renderer

        try:
            self._digests = [adapter_digest(self._registry, r.adapter, r.version) for r in self._resolved]
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
            return
        with contextlib.suppress(Exception):  # warming only: the card itself raises what goes wrong here
            tool_versions()
            load_renderer()

    def result(self) -> list[str | None]:
        """One digest per adapter, in order (None where there is no file to name); re-raises
        the thread's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return list(self._digests)


class BaseDigests:
    """The base's file digests, hashed in a background thread while the caller goes on.

    `lookup()` asks the store's cache (`lookup_file_digests`: one query; a store that does
    not exist yet answers nothing) and the thread hashes only the files it did not answer.
    The query runs in the caller's thread (an in-process store: the caller keeps its one
    handle, and the thread never touches the database), or with `in_thread` first thing in
    the thread (a `registry.worker` still importing: the caller need not wait for it). A
    merge starts this before importing torch, so the hashing (hashlib releases the GIL)
    overlaps the import and the merge. `result(registry)` joins and records the fresh
    digests; `cancel()` stops the thread at its next buffer (a failed run does not wait for
    a whole hash).
    """

    def __init__(self, lookup: Callable[[], PendingDigests], *, in_thread: bool = False):
        self._lookup = lookup
        self._pending: PendingDigests | None = None if in_thread else lookup()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="base-digests", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._pending is None:
                self._pending = self._lookup()
            if not self._stop.is_set():
                self._pending.hash()
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc

    def cancel(self) -> None:
        """Stop hashing (at the next buffer) and wait for the thread."""
        self._stop.set()
        if self._pending is not None:
            self._pending.cancel()
        self._thread.join()

    def result(self, registry: Any) -> dict[str, str]:
        """The digests, {file name: `sha256:<hex>`}, recorded in `registry`'s cache; re-raises
        the thread's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return registry.finish_file_digests(self._pending)


def build_recipe(kind: str, checkpoint: Checkpoint, base_digests: dict[str, str], adapters: Sequence[Any],
                 weights: Sequence[float], dtype: str, accumulate: str,
                 summary: dict[str, Any], adapter_digests: Sequence[str | None],
                 hub: dict[str, str] | None = None) -> dict[str, Any]:
    """The artifact's recipe. `adapters` are `ResolvedAdapter`s (anything with `describe(w)`).
    `hub` ({"repo", "commit"}) names the base when it was resolved from the Hugging Face Hub."""
    cfg = checkpoint.config
    recipe = {
        "kind": kind,
        "base": {
            "path": str(Path(checkpoint.root).resolve()),
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
            "name_or_path": cfg.get("_name_or_path"),
            "files": {p.name: base_digests[p.name] for p in checkpoint.paths},
            **({"hub": hub} if hub else {}),
        },
        "adapters": [{**r.describe(w), "folder_digest": d} for r, w, d in zip(adapters, weights, adapter_digests)],
        "dtype": dtype,
        "accumulate": accumulate,
        "tools": tool_versions(),
    }
    for key in ("opset", "untied", "export", "merge"):
        if key in summary:
            recipe[key] = summary[key]
    return recipe


def adapter_digest(registry: Any | None, adapter: Adapter, version: Any | None) -> str | None:
    """The digest of an adapter's weights file: recorded in the store for a registry
    version, else from the registry's file-digest cache (folders on disk), or hashed
    here when there is no registry handle to ask (adapters are small)."""
    for f in (getattr(version, "files", None) or []) if version is not None else []:
        if f.get("path") == ADAPTER_WEIGHTS:
            return f["digest"]
    if adapter.path is None:
        return None
    p = Path(adapter.path) / ADAPTER_WEIGHTS
    if not p.is_file():
        return None
    if registry is None:
        from mora_core.checkpoint import member
        from registry.copying import hash_file

        return hash_file(member(adapter.path, ADAPTER_WEIGHTS))[0]
    return registry.file_digests([p]).get(p.name)


def register_output(registry: Any, kind: str, out_dir: Path, files: dict[str, str] | None, checkpoint: Checkpoint,
                    base_digests: dict[str, str], resolved: Sequence[Any], weights: Sequence[float], dtype: str,
                    accumulate: str, summary: dict[str, Any], output: int | None = None,
                    hub: dict[str, str] | None = None,
                    adapter_digests: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Record the output (whose `files` digests were taken while it was written) as an
    artifact whose lineage points at every registry version that went in. `files=None`
    (an exporter that does not hash as it writes) lets the registry hash the output.
    `hub` ({"repo", "commit"}) names the base when it was resolved from the Hugging Face Hub.
    `adapter_digests`: one per adapter when already known (`AdapterDigests`), else found here."""
    digests = (list(adapter_digests) if adapter_digests is not None
               else [adapter_digest(registry, r.adapter, r.version) for r in resolved])
    recipe = build_recipe(kind, checkpoint, base_digests, resolved, weights, dtype, accumulate, summary, digests,
                          hub=hub)
    inputs = [(r.ref, w) for r, w in zip(resolved, weights) if r.version is not None]
    info = registry.register_artifact(kind=kind, path=out_dir, files=files, recipe=recipe, inputs=inputs,
                                      output=output, report=summary.get("validation"))
    return info.to_dict()
