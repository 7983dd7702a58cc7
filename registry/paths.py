"""File paths the store records and later joins to a folder: one rule, checked on write and on read.

The database may have been written by someone else (a shared PostgreSQL server, a copied
SQLite file), so a stored path is data to check, never a path to trust: `pull` and
`materialize` join version file names to their destination, `verify` joins artifact file
names to the artifact's folder. A stored path is

- a version file: one plain name (`adapter_model.safetensors`), no folder part;
- an artifact file: a relative POSIX path whose every part is such a name.

A plain name is 1-255 bytes of UTF-8, not `.` or `..`, without `/`, `\\`, NUL or any
other control character. `join_inside` also refuses a result whose existing parents
leave the root through a symbolic link. The caller picks the error class: a user's input
(`RegistryError`) on write, a damaged store (`IntegrityError`) on read.
"""

from __future__ import annotations

from pathlib import Path

from registry.errors import RegistryError

MAX_NAME_BYTES = 255  # one path component on Linux/macOS file systems
MAX_PARTS = 16


def check_file_name(name: object, what: str = "file name", error: type[RegistryError] = RegistryError) -> str:
    """`name` if it is one plain file name (see the module docstring), else `error`."""
    if not isinstance(name, str) or not name:
        raise error(f"{what} {name!r}: empty or not text")
    problem = None
    if name in (".", ".."):
        problem = "'.' and '..' are not file names"
    elif "/" in name or "\\" in name:
        problem = "a plain file name has no folder part"
    elif any(not c.isprintable() for c in name):
        problem = "control characters are not allowed"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise error(f"{what} {name[:80]!r}: {problem}")
    return name


def check_relative_path(path: object, what: str = "path", error: type[RegistryError] = RegistryError) -> str:
    """`path` if it is a relative POSIX path of plain names (`a/b.json`), else `error`."""
    if not isinstance(path, str) or not path:
        raise error(f"{what} {path!r}: empty or not text")
    if path.startswith("/"):
        raise error(f"{what} {path[:80]!r}: absolute paths are not allowed")
    parts = path.split("/")
    if len(parts) > MAX_PARTS:
        raise error(f"{what} {path[:80]!r}: more than {MAX_PARTS} levels")
    for part in parts:
        check_file_name(part, f"{what} {path[:80]!r}: part", error)
    return path


def join_inside(root: Path, rel: str, what: str = "path", error: type[RegistryError] = RegistryError,
                nested: bool = False) -> Path:
    """`root / rel` after checking `rel` (a plain name, or with `nested` a relative path).

    Also refuses the join when a part that already exists is a symbolic link, so even a
    folder planted under `root` cannot redirect the path outside it.
    """
    rel = check_relative_path(rel, what, error) if nested else check_file_name(rel, what, error)
    out = Path(root)
    for part in rel.split("/"):
        out = out / part
        if out.is_symlink():
            raise error(f"{what} {rel!r}: {out} is a symbolic link")
    return out
