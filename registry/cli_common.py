"""What every command shares: one-line errors with exit codes, and a TTY progress line.

Exit codes: 0 success; 1 a check ran and found a problem (`verify`, ONNX validation);
2 the user's input is wrong (nothing was changed); 130 interrupted.
Importing this module must stay cheap (no torch): `adapters list` goes through it.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

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
    from registry.errors import RegistryError

    types: list[type[BaseException]] = [UserError, RegistryError]
    core = sys.modules.get("mora_core.errors")  # only raised if mora_core was imported
    if core is not None:
        types.append(core.MoraCoreError)
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
        if isinstance(exc, OSError):
            fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        raise


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of `run_guarded` for click command functions."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result: list[Any] = []
        run_guarded(lambda: result.append(fn(*args, **kwargs)))
        return result[0] if result else None

    return wrapper


class ProgressLine:
    """`merged 1.2/3.4 GB  model.layers.3.mlp.up_proj.weight` on a TTY, nothing otherwise."""

    def __init__(self, enabled: bool, every: float = 0.2, verb: str = "merged", unit: str = "bytes"):
        self.enabled = enabled
        self.verb = verb
        self.unit = unit  # "bytes" (shown as GB) or "steps"
        self._every = every
        self._last = 0.0
        self._shown = False

    def update(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self._every and done < total):
            return
        self._last = now
        amount = f"{done / 1e9:.2f}/{total / 1e9:.2f} GB" if self.unit == "bytes" else f"{done}/{total}"
        line = f"{self.verb} {amount}  {what}"[:100]
        click.echo(f"\r{line:<100}", err=True, nl=False)
        self._shown = True

    def close(self) -> None:
        if self._shown:
            click.echo("\r" + " " * 100 + "\r", err=True, nl=False)
            self._shown = False
