"""What every command shares: one-line errors with exit codes, and a TTY progress line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import NoReturn

import click

EXIT_INPUT = 2  # the user's input is wrong; nothing was changed
EXIT_CHECK = 1  # a check ran and failed (validation, verify)


class UserError(ValueError):
    """A mistake in the command line itself (not in a file)."""


class CheckFailed(RuntimeError):
    """A check that ran and failed: exit code 1, with a one-line reason."""


def fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _input_error_types() -> tuple[type[BaseException], ...]:
    from mora_core.errors import MoraCoreError

    types: list[type[BaseException]] = [UserError, MoraCoreError]
    try:
        from registry.errors import RegistryError

        types.append(RegistryError)
    except ImportError:  # pragma: no cover - registry always ships with this package
        pass
    return tuple(types)


def run_guarded(body: Callable[[], None]) -> None:
    """Run a command body; user mistakes become one line on stderr and a non-zero exit."""
    try:
        body()
    except CheckFailed as exc:
        fail(str(exc), EXIT_CHECK)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:
        if isinstance(exc, _input_error_types()):
            fail(str(exc))
        if isinstance(exc, OSError) and exc.filename:
            fail(f"{exc.filename}: {exc.strerror}")
        raise


class ProgressLine:
    """`merged 1.2/3.4 GB  model.layers.3.mlp.up_proj.weight` on a TTY, nothing otherwise."""

    def __init__(self, enabled: bool, every: float = 0.2):
        self.enabled = enabled
        self._every = every
        self._last = 0.0
        self._shown = False

    def update(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self._every and done < total):
            return
        self._last = now
        line = f"merged {done / 1e9:.2f}/{total / 1e9:.2f} GB  {what}"[:100]
        click.echo(f"\r{line:<100}", err=True, nl=False)
        self._shown = True

    def close(self) -> None:
        if self._shown:
            click.echo("\r" + " " * 100 + "\r", err=True, nl=False)
            self._shown = False
