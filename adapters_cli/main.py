"""The `adapters` command: the composition root of the project.

Each command family lives in its own module and is imported only when one of its commands
runs, so that `adapters list` never pays for torch, transformers or alembic. The table
below is the whole command line: a name and a function that imports and returns the
command. Nothing imports this package.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import click


def _batch():
    from adapters_cli import batch

    return batch


def _ui():
    from adapters_cli.ui import command

    return command


def _store():
    from adapters_cli import store

    return store


def _merge():
    from adapters_cli import merge

    return merge


def _generate():
    from adapters_cli import generate

    return generate


def _serve():
    from adapters_cli import serve

    return serve


def _hub():
    from adapters_cli import hub

    return hub


def _run():
    from adapters_cli import run

    return run


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2

# command name -> loader. Kept sorted for `adapters --help`.
COMMANDS: dict[str, Callable[[], click.Command]] = {
    "audit": lambda: _store().audit,
    "batch": lambda: _batch().batch,
    "db": lambda: _store().db,
    "export": lambda: _serve().export,
    "gc": lambda: _store().gc,
    "generate": lambda: _generate().generate,
    "import": lambda: _hub().import_,
    "lineage": lambda: _store().lineage,
    "list": lambda: _store().list_,
    "merge": lambda: _merge().merge,
    "pack": lambda: _serve().pack,
    "publish": lambda: _hub().publish,
    "pull": lambda: _store().pull,
    "push": lambda: _store().push,
    "rm": lambda: _store().rm,
    "run": lambda: _run().run,
    "show": lambda: _store().show,
    "tag": lambda: _store().tag,
    "untag": lambda: _store().untag,
    "ui": lambda: _ui().ui,
    "verify": lambda: _store().verify,
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module on first use."""

    def __init__(self, *args, lazy: dict[str, Callable[[], click.Command]], **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            return self._lazy[cmd_name]()
        return super().get_command(ctx, cmd_name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's main, except that a usage mistake (bad option value, unknown option, missing
        argument) is one `error:` line and exit 2, like every other input mistake."""
        from adapters_cli.common import EXIT_INPUT, fail

        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # `adapters` alone: the help text, as click does
            click.echo(exc.format_message(), err=True)
            code = EXIT_INPUT
        except click.UsageError as exc:
            cmd = f"{exc.ctx.command_path}: " if exc.ctx is not None and exc.ctx.command is not self else ""
            fail(f"{cmd}{exc.format_message()} (see --help)", EXIT_INPUT, as_json="--json" in argv)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code, as_json="--json" in argv)
        except click.Abort:
            fail("interrupted", 130)
        if not standalone_mode:
            return code
        sys.exit(code or 0)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapter-registry")
def cli() -> None:
    """Keep LoRA/MoRA adapters, fold them into base models, ship validated ONNX.

    \b
    Examples:
      adapters merge ./my-mora --base ./llama --to safetensors -o ./merged
      adapters push ./my-mora --name team/llama-mora --base-model meta-llama/Llama-3-8B
      adapters list --json
    """


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code instead of raising SystemExit.

    The process ends right after, so everything still alive is frozen out of the garbage
    collector first: the interpreter's last collection then skips it (torch alone is about
    a million objects, and walking them at exit cost ~0.3 s of CPU per command). Only the
    entry point does this; an in-process caller of `cli` is not affected.
    """
    try:
        cli.main(args=argv, prog_name="adapters", standalone_mode=True)
    except SystemExit as exc:  # click always exits; keep the code
        return int(exc.code or 0)
    finally:
        gc.freeze()
    return 0


def entry() -> NoReturn:
    """The `adapters` console script and `python -m adapters_cli`: `main`, then `exit_now`."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once the command is done, without the interpreter's teardown.

    Why: after a merge every byte is written, fsynced and recorded, yet Python's own teardown
    of a process holding torch (module and thread-state teardown, native destructors) took
    0.2-0.3 s more on every command (bench/bench_merge_folder.py); the OS frees all of it at
    once. What a normal exit owes others still happens first: every atexit handler runs (the
    libraries' cleanups: Ray's shutdown, temporary folders) and the standard streams are
    flushed. While a non-daemon thread still runs, the exit is the normal one (it waits).
    Only the entry points call this; `main` returns to in-process callers.
    """
    me = threading.current_thread()
    if any(t is not me and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
