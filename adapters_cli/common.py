"""What every command shares: the store options, one-line errors with exit codes, output helpers,
and a TTY progress line.

Exit codes: 0 success; 1 a check ran and found a problem (`verify`, ONNX validation);
2 the user's input is wrong (nothing was changed); 130 interrupted.

This is the only place that turns library errors into exit codes: `RegistryError`,
`MoraCoreError` and `ExportError` are input mistakes (2), `ValidationFailed` a failed
check (1). Importing this module stays cheap (no torch): `adapters list` goes through it.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click

from registry.errors import RegistryError

EXIT_CHECK = 1  # a check ran and failed (validation, verify)
EXIT_INPUT = 2  # the user's input is wrong; nothing was changed
EXIT_INTERRUPTED = 130


class UserError(ValueError):
    """A mistake in the command line itself (not in a file)."""


class CheckFailed(RuntimeError):
    """A check run by the CLI itself that failed: exit code 1, with a one-line reason."""


def one_line(message: str) -> str:
    """A message as one line: whatever a library put in it (newlines, control characters)."""
    text = " ".join(str(message).split("\n")).strip()
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def wants_json(args: list[str] | None = None) -> bool:
    """Whether the running command was given `--json` (from its parsed options, else from `args`)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("as_json"):
        return True
    return bool(args) and "--json" in args


def fail(message: str, code: int = EXIT_INPUT, *, as_json: bool | None = None) -> NoReturn:
    """One `error:` line on stderr and exit `code`; under `--json` also `{"error", "code"}` on stdout.

    Scripts that parse stdout of a `--json` command get a JSON document for a failure too.
    """
    line = one_line(message)
    if wants_json() if as_json is None else as_json:
        click.echo(json.dumps({"error": line, "code": code}))
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


def _classify(exc: BaseException) -> int | None:
    """The exit code of a library error, or None for anything else (a bug: traceback).

    The heavy libraries' error modules are tiny and import nothing heavy themselves, so
    checking against them costs nothing even on `adapters list`.
    """
    from exporters.errors import ExportError, ValidationFailed
    from mora_core.errors import MoraCoreError

    if isinstance(exc, (CheckFailed, ValidationFailed)):
        return EXIT_CHECK
    if isinstance(exc, (UserError, RegistryError, MoraCoreError, ExportError)):
        return EXIT_INPUT
    return None


def run_guarded(body: Callable[[], Any], progress: ProgressLine | None = None) -> Any:
    """Run a command body; library errors become one `error:` line and their exit code.

    `progress`, when given, is closed as the body ends, before any error line is printed
    (the error must not share the self-overwriting progress line).
    """
    try:
        if progress is None:
            return body()
        try:
            return body()
        finally:
            progress.close()
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        code = _classify(exc)
        if code is not None:
            fail(str(exc), code)
        if isinstance(exc, OSError):
            fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        raise


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of `run_guarded` for click command functions."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_guarded(lambda: fn(*args, **kwargs))

    return wrapper


# ----------------------------------------------------------------------------- options

BLOB_URL_KEY = "adapters.blob_url"


def _remember_blob_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[BLOB_URL_KEY] = value


def blob_url() -> str | None:
    """The `--blob-url` given to the running command (None: $ADAPTERS_BLOB_URL or the recorded one)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(BLOB_URL_KEY) if ctx is not None else None


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--home`, `--db-url`, `--blob-url` and `--json`, the same way on every command.

    `--blob-url` is not passed to the command function (it would change every signature):
    commands read it with `blob_url()` when they open the registry.
    """
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)
    fn = click.option("--blob-url", envvar="ADAPTERS_BLOB_URL", default=None, expose_value=False,
                      callback=_remember_blob_url, is_eager=True,
                      help="Blobs in s3://BUCKET/PREFIX (default: $ADAPTERS_BLOB_URL, else the URL "
                           "recorded in the database, else the home).")(fn)
    fn = click.option("--db-url", envvar="ADAPTERS_DB_URL", default=None,
                      help="Database URL (default: $ADAPTERS_DB_URL or SQLite in the home).")(fn)
    fn = click.option("--home", envvar="ADAPTERS_HOME", default=None, type=click.Path(file_okay=False),
                      help="Registry home (default: $ADAPTERS_HOME or the user data dir).")(fn)
    return fn


def version_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a new version, the same for `push` and `import`: `--name`, the base
    identity (`--base-model`, `--base-revision`, `--base`), `--parent`, `--tag`, `--meta`, `--message`."""
    fn = click.option("--message", "-m", help="Free-text description.")(fn)
    fn = click.option("--meta", multiple=True, help="KEY=VALUE metadata (repeatable).")(fn)
    fn = click.option("--tag", "tags", multiple=True, help="Alias to point at the new version (repeatable).")(fn)
    fn = click.option("--parent", help="Reference of the version this one was derived from.")(fn)
    fn = click.option("--base", "base_dir", help="Base model folder, or hf:ORG/NAME[@REVISION] from the Hub: "
                      "record its repo, resolved commit and weight digests.")(fn)
    fn = click.option("--base-revision", help="Base model revision.")(fn)
    fn = click.option("--base-model", help="Base model identity (hub id or name).")(fn)
    fn = click.option("--name", required=True, help="Adapter name in the registry, e.g. team/llama-mora.")(fn)
    return fn


class SizeType(click.ParamType):
    """A byte size like `2GB`, `500MB`, `1.5GiB` or `1048576` (see exporters.pipeline.parse_size)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from exporters.errors import ExportError
        from exporters.pipeline import parse_size

        try:
            return parse_size(value)
        except ExportError as exc:
            self.fail(str(exc), param, ctx)


def complete_ref(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of references from the store (never creates a store; silent on any error)."""
    import os
    from pathlib import Path

    from click.shell_completion import CompletionItem

    home = ctx.params.get("home") or os.environ.get("ADAPTERS_HOME")
    db_url = ctx.params.get("db_url") or os.environ.get("ADAPTERS_DB_URL")
    try:
        from registry.api import Registry, resolve_url

        if home is None:
            import platformdirs

            home = platformdirs.user_data_dir("adapters", appauthor=False)
        url = db_url or resolve_url(Path(home))
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
            return []  # no store here: nothing to complete, and nothing is created
        with Registry.open(home, db_url, create=False) as reg:
            return [CompletionItem(r) for r in reg.complete_refs(incomplete)]
    except Exception:  # completion must never print a traceback into the user's shell
        return []


def parse_ids(text: str, option: str = "--ids") -> list[int]:
    """`1,2,3` -> [1, 2, 3]; `UserError` naming `option` for anything else."""
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UserError(f"{option} {text[:80]!r}: expected comma-separated integers like 1,2,3") from None
    if not out or any(not 0 <= i < 2**63 for i in out):  # int64 token ids: numpy would overflow past 2**63-1
        raise UserError(f"{option} {text[:80]!r}: give at least one token id, each from 0 to 2**63-1")
    return out


# ----------------------------------------------------------------------------- output

def to_json(obj: Any, indent: int = 2) -> str:
    """Indented JSON in which a list of plain values (token ids, shapes, weights) stays on one line."""

    def enc(o: Any, level: int) -> str:
        inner, pad = " " * (indent * (level + 1)), " " * (indent * level)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{inner}{json.dumps(k if isinstance(k, str) else str(k))}: {enc(v, level + 1)}"
                     for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if not any(isinstance(x, (dict, list, tuple)) for x in o):
                return json.dumps(list(o), default=str)
            return "[\n" + ",\n".join(inner + enc(x, level + 1) for x in o) + "\n" + pad + "]"
        return json.dumps(o, default=str)

    return enc(obj, 0)


def emit_json(obj: Any) -> None:
    click.echo(to_json(obj))


def table(rows: list[list[str]], header: list[str]) -> None:
    """Left-aligned columns, two spaces apart."""
    if not rows:
        return
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class ProgressLine:
    """One self-overwriting line on stderr when it is a terminal; silent when piped.

    `stage(name)` names the step under way ("merging", "exporting the ONNX graph"...): the
    line then shows the stage and its elapsed seconds, refreshed by a ticker thread even
    while one long call (the ONNX export) reports nothing. `update(done, total, what)` adds
    counted work to the line (bytes are shown as GB when `unit` is "bytes"); `add(n)` for
    byte streams of unknown total (push, pull, verify). Library code never prints: it gets
    `stage`/`update` as callbacks (`MergeOptions.on_stage`, `progress`).
    """

    def __init__(self, enabled: bool | None = None, verb: str = "merged", unit: str = "bytes",
                 every: float = 0.2, tick: float = 0.5):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.verb = verb
        self.unit = unit
        self._every = every
        self._tick = tick
        self._last = 0.0
        self._shown = False
        self._done = 0
        self._stage: str | None = None
        self._stage_start = time.monotonic()
        self._detail = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def stage(self, name: str) -> None:
        """Start stage `name` (its clock starts now); shown at once and ticking."""
        if not self.enabled:
            return
        with self._lock:
            self._stage, self._stage_start, self._detail = name, time.monotonic(), ""
            self._render()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._run_ticker, name="progress-ticker", daemon=True)
            self._ticker.start()

    def _run_ticker(self) -> None:
        while not self._stop.wait(self._tick):
            with self._lock:
                self._render()

    def update(self, done: int, total: int, what: str = "") -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self._every and (not total or done < total)):
            return
        self._last = now
        if self.unit == "bytes":
            amount = f"{human_size(done)}/{human_size(total)}" if total else human_size(done)
        else:
            amount = f"{done}/{total}"
        with self._lock:
            self._detail = f"{amount}  {what}" if self._stage else f"{self.verb} {amount}  {what}"
            self._render()

    def add(self, n: int) -> None:
        self._done += n
        self.update(self._done, 0)

    def _render(self) -> None:
        """The line: `<stage> <elapsed>s  <detail>` (or the detail alone before any stage)."""
        if self._stage:
            line = f"{self._stage} {time.monotonic() - self._stage_start:.1f}s  {self._detail}"
        elif self._detail:
            line = self._detail
        else:
            return
        self._show(line.rstrip())

    def _show(self, line: str) -> None:
        line = line[:100]
        click.echo(f"\r{line:<100}", err=True, nl=False)
        self._shown = True

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self._shown:
                click.echo("\r" + " " * 100 + "\r", err=True, nl=False)
                self._shown = False
