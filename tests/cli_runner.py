"""The one way tests run the `adapters` command: in-process (fast) or as a real process.

- `invoke(args, env)`: click's runner in this process; `ADAPTERS_*` variables come only from `env`.
- `run_adapters(args, env=None, home=None)`: `python -m adapters_cli` as a subprocess (for exit
  codes of the real entry point, signals, imports a fresh process pays).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ENTRY = [sys.executable, "-m", "adapters_cli"]


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def invoke(args: Iterable[object], env: Mapping[str, str] | None = None) -> CliResult:
    """Run `adapters ARGS` in-process with the store of `env` (ADAPTERS_* only)."""
    from click.testing import CliRunner

    from adapters_cli.main import cli

    run_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ADAPTERS_")}
    run_env.update({k: v for k, v in (env or {}).items() if k.startswith("ADAPTERS_")})
    res = CliRunner().invoke(cli, [str(a) for a in args], env=run_env, catch_exceptions=False)
    return CliResult(res.exit_code, res.stdout, res.stderr)


def process_env(env: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """This process's environment without ADAPTERS_*, plus `env`, plus ADAPTERS_HOME=`home`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERS_")}
    out.update(env or {})
    if home is not None:
        out["ADAPTERS_HOME"] = str(home)
    return out


def run_adapters(args: Iterable[object], env: Mapping[str, str] | None = None, home: Path | None = None,
                 timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`adapters ARGS` as a real process; returns the CompletedProcess (text mode)."""
    return subprocess.run([*ENTRY, *map(str, args)], capture_output=True, text=True,
                          env=process_env(env, home), timeout=timeout, **kw)
