"""A registry handle in a separate process, for a merge that registers its output.

Why: a merge's process imports torch (~1.2 s of one CPU), and Python runs one import at a
time. Importing SQLAlchemy and the registry's models and opening the store take another
~0.4 s, which in the same process queue behind torch's import (threads do not help: both
imports hold the GIL). Started first, a worker process imports and opens the store on
another CPU while the merge imports torch; by the time the merge needs its first row (the
pending-output record, before its first byte) the store is open. The merge's process
then never imports SQLAlchemy. Measured with bench/bench_merge_folder.py (bench/README.md).

`RegistryWorker` answers the part of `registry.api.Registry` a merge uses, with the same
signatures (the store's file-digest cache, the pending-output record, the artifact), so
`exporters.pipeline` drives either one. Each call is one request and one answer, in order,
as JSON lines on the worker's stdin/stdout: `{"verb": name, "args": {...}}` answered by
`{"ok": result}` or `{"error": [type name, message]}`; `VERBS` is the whole protocol.
A `RegistryError` (and its subclasses the merge's process knows) arrives as itself.

Lifetime: the worker ignores SIGINT (the merge handles Ctrl-C and then asks it to forget
the pending output) and exits at the end of its input, so a merge killed outright leaves
nothing running. A worker that dies is reported as one `RegistryError` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from registry.errors import IntegrityError, RegistryError, StoreMissing
from registry.file_digests import (
    HashedFile,
    Identity,
    PendingDigests,
    cached,
    pending_digests,
    store,
)
from registry.info import ArtifactInfo

# the worker's entry point: the caller's working folder (first on `-c`'s path) is dropped,
# so that a `registry/` folder there is never imported instead of this package
BOOT = "import sys; del sys.path[0]; from registry.worker import main; main()"
ERRORS: dict[str, type[RegistryError]] = {e.__name__: e for e in (RegistryError, IntegrityError, StoreMissing)}


class RegistryWorker:
    """A store opened in a child process (`registry.worker.main`); see the module docstring.

    The process starts (and imports the registry) at construction; the store is opened by
    the first call (`open`, or any verb). Thread-safe: calls are serialised.
    """

    def __init__(self, home: str | Path | None = None, db_url: str | None = None, blob_url: str | None = None):
        root = str(Path(__file__).resolve().parents[1])  # the folder holding this `registry` package
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
        where = {"home": None if home is None else str(home), "db_url": db_url, "blob_url": blob_url}
        self._proc = subprocess.Popen([sys.executable, "-c", BOOT, json.dumps(where)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the protocol
    def _call(self, verb: str, **args: Any) -> Any:
        with self._lock:
            if self._proc.stdin is None or self._proc.stdin.closed:
                raise RegistryError("the registry worker is closed")
            try:
                self._proc.stdin.write(json.dumps({"verb": verb, "args": args}).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except (BrokenPipeError, ConnectionResetError):
                line = b""
            if not line:
                raise RegistryError(f"the registry worker process ended unexpectedly (exit status "
                                    f"{self._proc.wait()}) during {verb}")
        answer = json.loads(line)
        if "error" in answer:
            kind, message = answer["error"]
            raise ERRORS.get(kind, RegistryError)(message if kind in ERRORS else f"{kind}: {message}")
        return answer["ok"]

    def open(self, create: bool = False) -> RegistryWorker:
        """Open the store in the worker (`Registry.open`'s rules; without `create` a missing
        store raises `StoreMissing`). Idempotent; returns self."""
        self._call("open", create=create)
        return self

    def close(self) -> None:
        """End the worker's input: it closes the store and exits. Every call was answered after
        its transaction committed, so nothing is left to wait for; a daemon thread reaps the
        process (its teardown, ~0.1 s, does not delay the caller). Idempotent."""
        with self._lock:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
                threading.Thread(target=self._reap, name="registry-worker-reaper", daemon=True).start()

    def _reap(self) -> None:
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to exit (after `close`); its exit status."""
        return self._proc.wait(timeout)

    # ------------------------------------------------------------------ Registry's verbs
    def lookup_file_digests(self, paths: Sequence[str | Path]) -> PendingDigests:
        """`Registry.lookup_file_digests`; files are stat'ed here, only the rows come from the
        worker. A store that does not exist yet answers nothing (as `file_digests.lookup(None)`)."""
        def query(keys: list[str]) -> dict[str, tuple[Identity, str]]:
            try:
                rows = self._call("cached_file_digests", keys=keys)
            except StoreMissing:
                return {}
            return {k: (Identity.from_json(ident), digest) for k, (ident, digest) in rows.items()}

        return pending_digests(paths, query)

    def finish_file_digests(self, pending: PendingDigests) -> dict[str, str]:
        """`Registry.finish_file_digests`; a store that does not exist caches nothing (as
        `PendingDigests.finish(None)`)."""
        def record(rows: list[HashedFile]) -> None:
            with contextlib.suppress(StoreMissing):
                self._call("record_file_digests", rows=[r.to_json() for r in rows])

        return pending.finish(record)

    def file_digests(self, paths: Sequence[str | Path]) -> dict[str, str]:
        return self._call("file_digests", paths=[str(p) for p in paths])

    def reclaim_output(self, path: str | Path) -> list[str]:
        return self._call("reclaim_output", path=str(path))

    def begin_output(self, path: str | Path, kind: str, pid: int | None = None) -> int:
        """`Registry.begin_output`, recorded for this process (the writer), not the worker."""
        return self._call("begin_output", path=str(path), kind=kind, pid=os.getpid() if pid is None else pid)

    def output_placed(self, token: int, path: str | Path) -> None:
        self._call("output_placed", token=token, path=str(path))

    def end_output(self, token: int) -> None:
        self._call("end_output", token=token)

    def register_artifact(self, *, kind: str, path: Path, files: dict[str, str] | None = None, recipe: dict,
                          inputs: list[tuple[str, float]], report: dict | None = None,
                          output: int | None = None) -> ArtifactInfo:
        return ArtifactInfo.from_dict(self._call(
            "register_artifact", kind=kind, path=str(path), files=files, recipe=recipe,
            inputs=[[ref, w] for ref, w in inputs], report=report, output=output))


# ---------------------------------------------------------------------- the worker's side
class _Store:
    """The worker's one `Registry` (home, db_url, blob_url as the caller gave them), opened
    on first use (`create` as asked)."""

    def __init__(self, home: str | None = None, db_url: str | None = None, blob_url: str | None = None):
        self.where = (home, db_url, blob_url)
        self.reg: Any = None

    def get(self, create: bool = False) -> Any:
        if self.reg is None:
            from registry.api import Registry

            home, db_url, blob_url = self.where
            self.reg = Registry.open(home, db_url, blob_url=blob_url, create=create)
        return self.reg


def _open(where: _Store, create: bool) -> None:
    where.get(create)


def _cached(where: _Store, keys: list[str]) -> dict[str, Any]:
    rows = cached(where.get().db, keys)
    return {k: [ident.to_json(), digest] for k, (ident, digest) in rows.items()}


def _record(where: _Store, rows: list[dict[str, Any]]) -> None:
    store(where.get().db, [HashedFile.from_json(r) for r in rows])


def _register(where: _Store, inputs: list[list[Any]], path: str, **args: Any) -> dict[str, Any]:
    return where.get().register_artifact(path=Path(path), inputs=[(r, w) for r, w in inputs], **args).to_dict()


VERBS: dict[str, Callable[..., Any]] = {
    "open": _open,
    "cached_file_digests": _cached,
    "record_file_digests": _record,
    "file_digests": lambda where, paths: where.get().file_digests(paths),
    "reclaim_output": lambda where, path: where.get().reclaim_output(path),
    "begin_output": lambda where, path, kind, pid: where.get(create=True).begin_output(path, kind, pid),
    "output_placed": lambda where, token, path: where.get().output_placed(token, path),
    "end_output": lambda where, token: where.get().end_output(token),
    "register_artifact": _register,
}


def serve(requests: IO[bytes], answers: IO[bytes], where: dict[str, Any]) -> None:
    """Answer requests about the store `where` names until the end of input, then close it."""
    import registry.api  # noqa: F401  (the point of the worker: imported while the caller imports torch)

    handle = _Store(**where)
    try:
        for line in requests:
            try:
                req = json.loads(line)
                answer: dict[str, Any] = {"ok": VERBS[req["verb"]](handle, **req["args"])}
            except Exception as exc:  # every failure is the caller's to raise
                answer = {"error": [type(exc).__name__, str(exc)]}
            answers.write(json.dumps(answer).encode() + b"\n")
            answers.flush()
    finally:
        if handle.reg is not None:
            handle.reg.close()


def main() -> None:
    """The worker process: serve, then end at once. Its stderr is the merge's, so whoever
    reads that pipe (a shell pipeline, a test, a benchmark) waits for the worker too: the
    interpreter's teardown with SQLAlchemy loaded (~80 ms here) is skipped once every answer
    was given and the store closed (nothing is left to write)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the merge's to handle (it then ends the output here)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # nothing printed by a library may corrupt the answers
    serve(sys.stdin.buffer, answers, json.loads(sys.argv[1]))
    answers.close()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
