"""Merge outputs being written: recorded in the store before their first byte, so that what a
killed merge leaves behind is known and can be cleaned (issue: `.out.partial-PID` folders of up
to 1 GB, and a renamed but unregistered output blocking a re-run).

The life of an output, as `exporters.pipeline` drives it:

1. `begin(path, kind)` records the output path, this host and process, and the partial
   folder the writer builds it in (`.<name>.partial-<pid>` beside it);
2. the writer fills the partial folder and renames it to `path`; `placed(token, path)`
   records the renamed folder's identity (device, inode);
3. `artifacts.register(..., output=token)` records the artifact and deletes the row in the
   same transaction. A failure in between calls `end(token)`.

A row left by a process that is gone (same host, pid not running) is stale: `reclaim(path)`
(a re-run with the same `-o`) removes its partial folder and, only if it is the very folder
that run renamed into place (same device and inode), its unregistered output; `gc` removes
stale partial folders. A path in a row is only ever used after checking it is absolute and
that the partial folder is `path`'s sibling of that exact name: the row could be forged.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from registry.db import Database
from registry.errors import RegistryError
from registry.models import Output


def partial_path(path: Path, pid: int) -> Path:
    """Where the process `pid` builds the output `path` (the writer's convention)."""
    path = Path(path)
    return path.parent / f".{path.name}.partial-{pid}"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return socket.gethostname()[:255]


def _stale(row: Output) -> bool:
    return row.host == _host() and not process_alive(row.pid)


def _stale_rows(rows: Iterable[Output]) -> Iterator[tuple[Output, Path, Path]]:
    """(row, output path, partial folder) of the rows whose writer is gone and whose recorded
    paths pass the stored-path check; the others are skipped."""
    for row in rows:
        if _stale(row):
            paths = _safe_paths(row)
            if paths is not None:
                yield row, *paths


def _safe_paths(row: Output) -> tuple[Path, Path] | None:
    """(output, partial) of a row, or None when the row does not follow the convention (forged)."""
    path = Path(row.path)
    if not path.is_absolute() or ".." in path.parts or not path.name:
        return None
    partial = partial_path(path, row.pid)
    return (path, partial) if row.partial == str(partial) else None


def begin(db: Database, path: str | Path, kind: str, pid: int | None = None) -> int:
    """Record that process `pid` (default: this one) starts writing the output `path`;
    returns the token. The writer's pid, not the caller's: a merge may register through a
    separate process (`registry.worker`), and staleness is judged by the writer's life.

    RegistryError if another live process (on this host) is writing the same path.
    """
    path = Path(path).absolute()
    pid = os.getpid() if pid is None else pid
    with db.writing() as s:
        for row in s.scalars(select(Output).where(Output.path == str(path))):
            if row.host == _host() and process_alive(row.pid) and row.pid != pid:
                raise RegistryError(f"{path}: another merge (process {row.pid}) is writing this output")
        row = Output(path=str(path), kind=kind[:32], host=_host(), pid=pid,
                     partial=str(partial_path(path, pid)), started=datetime.now(timezone.utc))
        s.add(row)
        s.flush()
        return row.id


def placed(db: Database, token: int, path: str | Path) -> None:
    """Record the identity of the folder just renamed to `path` (so a re-run may replace it)."""
    st = os.stat(path)
    with db.writing() as s:
        row = s.get(Output, token)
        if row is not None:
            row.device, row.inode = st.st_dev, st.st_ino


def end(db: Database, token: int) -> None:
    """Forget a pending output (its writer failed cleanly and removed what it wrote)."""
    with db.writing() as s:
        s.execute(delete(Output).where(Output.id == token))


def complete(s: Session, token: int) -> None:
    """Inside the transaction that registers the artifact: the output is no longer pending, nor
    is any stale record of an earlier, killed run to the same path (its output was replaced)."""
    row = s.get(Output, token)
    if row is None:
        return
    for other in s.scalars(select(Output).where(Output.path == row.path)).all():
        if other.id == token or _stale(other):
            s.delete(other)


def reclaim(db: Database, path: str | Path) -> list[str]:
    """Clean what killed merges left at `path` (see the module docstring); returns what was removed.

    RegistryError when an unregistered output is there that cannot be proven to be the one a
    killed merge renamed into place (then the user decides).
    """
    path = Path(path).absolute()
    removed: list[str] = []
    with db.writing() as s:
        for row, out, partial in _stale_rows(s.scalars(select(Output).where(Output.path == str(path))).all()):
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
                removed.append(str(partial))
            if out.exists() or out.is_symlink():
                st = os.lstat(out)
                if row.inode is None or (st.st_dev, st.st_ino) != (row.device, row.inode) or out.is_symlink():
                    raise RegistryError(f"{out}: left by a merge that was killed before registering it "
                                        f"(process {row.pid}); remove it and run again")
                shutil.rmtree(out)
                removed.append(str(out))
            s.delete(row)
    return removed


def gc_leftovers(s: Session, dry_run: bool) -> tuple[list[str], int, list[str]]:
    """For `gc`, inside its write transaction: (partial folders removed, their bytes, unregistered
    outputs of killed merges left in place for the user or a re-run)."""
    removed: list[str] = []
    freed = 0
    unfinished: list[str] = []
    for row, out, partial in _stale_rows(s.scalars(select(Output).order_by(Output.id)).all()):
        if partial.is_dir() and not partial.is_symlink():
            freed += sum(p.stat().st_size for p in partial.rglob("*") if p.is_file() and not p.is_symlink())
            removed.append(str(partial))
            if not dry_run:
                shutil.rmtree(partial, ignore_errors=True)
        if out.exists():
            unfinished.append(str(out))
        elif not dry_run:
            s.delete(row)
    return removed, freed, unfinished


def pending(db: Database) -> list[dict[str, Any]]:
    """Every recorded pending output (for reports and tests)."""
    with db.read() as s:
        return [{"path": r.path, "kind": r.kind, "host": r.host, "pid": r.pid, "stale": _stale(r)}
                for r in s.scalars(select(Output).order_by(Output.id))]
