"""A base model checkpoint, opened once per run: weight files, index, config, tied pairs.

Why one object: a merge, its ONNX export and its recipe all need the same facts about
the base (which shards, their validated headers, `config.json`, which tensor a tied
`lm_head` shares). Opening the folder once and passing the `Checkpoint` along means the
index is parsed once, every header validated once, and all of them agree.

The folder rule, in one place (`member`): a file is read from a folder (a base model, an
adapter, an ONNX export) only if it is a *regular file* whose real path lies *inside the
folder* (or, for a Hugging Face cache snapshot, in its repository's `blobs/`). A symlink
to a sibling is followed; a symlink leaving the folder (or pointing at a device, FIFO or
directory) is refused. The side-file copier of `exporters.outputs`, `load_adapter` and
`adapters run` apply the same rule; the bytes are then read by `mora_core.safe_io`.

`WEIGHT_SUFFIXES` is the one table of weight-file name endings (safetensors, pickles,
other frameworks): what the merge reads, what a push hashes as the base's identity, what
is refused as a pickle, and what is never copied as a side file all derive from it.

No torch import here: the registry may read the table and open a checkpoint's headers.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mora_core.errors import MergeError, MoraCoreError
from mora_core.safe_io import read_json
from mora_core.safetensors_io import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_MAX_BYTES = 16 << 20

# name ending -> what the file holds. "pickle" files can run code when loaded: refused.
WEIGHT_SUFFIXES: dict[str, str] = {
    ".safetensors": "safetensors",
    ".bin": "pickle", ".pt": "pickle", ".pth": "pickle", ".pkl": "pickle", ".ckpt": "pickle",
    ".h5": "keras", ".msgpack": "flax", ".gguf": "gguf",
    ".onnx": "onnx", ".onnx_data": "onnx", ".onnx.data": "onnx",
}
PICKLE_SUFFIXES = tuple(s for s, kind in WEIGHT_SUFFIXES.items() if kind == "pickle")
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json

# tied output projection -> names its input embedding may have
TIED_OUTPUT = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def weight_kind(name: str) -> str | None:
    """What a file of this name holds per `WEIGHT_SUFFIXES` (None: not a weight file)."""
    lower = name.lower()
    for suffix, kind in WEIGHT_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def is_weight_or_index(name: str) -> bool:
    """Weights and weight indexes: never copied beside an output, never taken as config."""
    return weight_kind(name) is not None or name.lower().endswith(INDEX_SUFFIX)


def member(root: str | os.PathLike[str], name: str, error_cls: type[MoraCoreError] = MergeError,
           nested: bool = False) -> Path:
    """The real path of `root/name` if the folder rule allows reading it, else `error_cls`.

    Allowed: a regular file whose resolved path lies inside the resolved `root` (so a
    symlink between files of the folder is fine), or, for a Hugging Face cache snapshot
    (`<repo>/snapshots/<revision>/`, whose files are links to `../../blobs/<hash>`),
    inside that repository's `blobs/`. Refused, with the reason: a missing file, a name
    with a path separator or `..`, a symlink that leaves the folder, and anything that is
    not a regular file (a FIFO named like a config would otherwise block the reader).
    Every folder the tool reads (base models, adapters, ONNX exports) goes through this.
    `nested`: `name` may be a relative posix path into a sub-folder (`1_Pooling/config.json`;
    each part a plain name), judged against the same roots as `root`'s own files.
    """
    folder = Path(root)
    path = folder / name
    parts = name.split("/") if nested else [name]
    if not name or any(not p or (os.sep != "/" and os.sep in p) or p in (".", "..") for p in parts) or (
            not nested and "/" in name):
        raise error_cls(f"{path}: not a plain file name inside {folder}")
    try:
        real_root = folder.resolve(strict=True)
        real = path.resolve(strict=True)
        st = os.stat(real)
    except (OSError, RuntimeError):
        raise error_cls(f"{path}: not found") from None
    if not any(real.parent == r or r in real.parents for r in _readable_roots(real_root)):
        raise error_cls(f"{path}: a symbolic link leaving the folder (to {real}); refused")
    if not stat.S_ISREG(st.st_mode):
        raise error_cls(f"{path}: not a regular file; refused")
    return real


def _readable_roots(real_root: Path) -> list[Path]:
    """Where the files of a folder may really lie: the folder, plus a HF cache repo's blobs/."""
    if real_root.parent.name == "snapshots" and (real_root.parent.parent / "blobs").is_dir():
        return [real_root, real_root.parent.parent / "blobs"]
    return [real_root]


def is_member(root: str | os.PathLike[str], name: str) -> bool:
    """Whether `member(root, name)` would allow reading the file."""
    try:
        member(root, name)
    except MergeError:
        return False
    return True


@dataclass
class Checkpoint:
    """A base model's safetensors files (in shard order, headers validated) and its facts."""

    root: Path
    files: list[SafetensorsFile]
    config: dict[str, Any] = field(default_factory=dict)
    weight_map: dict[str, str] | None = None  # the index's tensor -> shard map (sharded bases)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's stored shape, in file order."""
        return {n: info.shape for f in self.files for n, info in f.tensors.items()}

    @cached_property
    def tied(self) -> dict[str, str]:
        """{tensor the checkpoint omits because it is tied: the tensor it shares}."""
        shapes = self.shapes
        if TIED_OUTPUT in shapes or not self.config.get("tie_word_embeddings", True):
            return {}
        for name in shapes:
            if name.endswith(EMBEDDING_SUFFIXES):
                return {TIED_OUTPUT: name}
        return {}

    @property
    def paths(self) -> list[Path]:
        """The weight files read, in shard order (what the base's identity is hashed from)."""
        return [f.path for f in self.files]

    def weight_file_names(self) -> set[str]:
        """Names of the files that hold this checkpoint's weights, index included."""
        return {f.path.name for f in self.files} | ({INDEX_NAME} if self.weight_map is not None else set())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for f in self.files for info in f.tensors.values())


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a base: a folder with `model.safetensors` or a sharded index, or one .safetensors file.

    Every header is validated and the index checked against the shards before this
    returns; pickle checkpoints are refused. Raises `MergeError` naming the file.
    """
    root = Path(path)
    if root.is_file():
        if root.suffix != ".safetensors":
            raise MergeError(f"{root}: only safetensors weights are read (no pickle checkpoints)")
        folder = root.parent
        return Checkpoint(folder, [_open_file(folder, root.name)], read_model_config(folder))
    if not root.is_dir():
        raise MergeError(f"{root}: base model not found")
    config = read_model_config(root)
    if (root / INDEX_NAME).exists() or (root / INDEX_NAME).is_symlink():
        weight_map = _read_index(root)
        files = [_open_file(root, n) for n in sorted(set(weight_map.values()))]
        for f in files:
            for t in f.tensors:
                if weight_map.get(t) != f.path.name:
                    raise MergeError(f"{root / INDEX_NAME}: tensor {t} is in {f.path.name} "
                                     f"but the index says {weight_map.get(t)}")
        return Checkpoint(root, files, config, weight_map)
    names = sorted(p.name for p in root.iterdir())
    if SINGLE_NAME in names:
        return Checkpoint(root, [_open_file(root, SINGLE_NAME)], config)
    singles = [n for n in names if n.endswith(".safetensors")]
    if len(singles) == 1:
        return Checkpoint(root, [_open_file(root, singles[0])], config)
    pickles = [n for n in names if weight_kind(n) == "pickle"]
    if pickles:
        raise MergeError(f"{root / pickles[0]}: pickle checkpoints are refused; convert the base to safetensors")
    raise MergeError(f"{root}: no model.safetensors or {INDEX_NAME} in the base folder")


def _open_file(root: Path, name: str) -> SafetensorsFile:
    member(root, name)  # the folder rule, checked before any byte is read
    return SafetensorsFile(root / name, MergeError)


def _read_index(root: Path) -> dict[str, str]:
    index = member(root, INDEX_NAME)
    doc = read_json(index, MergeError, CONFIG_MAX_BYTES, what="safetensors index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MergeError(f"{root / INDEX_NAME}: not a valid safetensors index (weight_map must map tensor "
                         "names to shard files)")
    for t, n in weight_map.items():
        if not isinstance(n, str) or "/" in n or os.sep in n or n.startswith(".") or not n:
            raise MergeError(f"{root / INDEX_NAME}: shard {str(n)[:80]!r} of {t[:80]!r} is not a plain file name")
    return weight_map


def read_model_config(root: Path) -> dict[str, Any]:
    """A model folder's `config.json` as a dict ({} when absent): the folder rule, then the strict reader."""
    path = root / CONFIG_NAME
    if not path.exists() and not path.is_symlink():
        return {}
    config = read_json(member(root, CONFIG_NAME), MergeError, CONFIG_MAX_BYTES, what="model config")
    if not isinstance(config, dict):
        raise MergeError(f"{path}: not a JSON object")
    return config
