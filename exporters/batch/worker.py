"""One job, as it runs in a worker process or a Ray task: the same `run_merge` as `adapters merge`.

`run_job(spec)` takes a plain dict (picklable, so it crosses process and node boundaries),
rebuilds the `MergeOptions`, runs the merge, registers the output and records it as the
result of the job's key (under the runner's lease, `spec["owner"]`), and returns a plain
dict: `{"status": "done", "artifact": ref, ...}` or `{"status": "failed", "error": line}`. A
bad input or a failed validation fails this job only; the batch goes on.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from exporters.pipeline import MergeOptions

# fault injection for the crash tests: ADAPTERS_CRASH_AT=batch_job and ADAPTERS_CRASH_JOB=<name>
# SIGKILL this job's whole process group once its merge has started writing
CRASH_POINT = "batch_job"


def options_spec(opts: MergeOptions) -> dict[str, Any]:
    """The picklable form of `opts` (no progress callback)."""
    d = asdict(opts)
    d.pop("progress", None)
    for k in ("base_dir", "out_dir", "home"):
        d[k] = str(d[k]) if d[k] is not None else None
    return d


def _options(spec: dict[str, Any]) -> MergeOptions:
    known = {f.name for f in fields(MergeOptions)}
    d = {k: v for k, v in spec.items() if k in known}
    for k in ("base_dir", "out_dir", "home"):
        d[k] = Path(d[k]) if d.get(k) is not None else None
    return MergeOptions(**d)


def _crash_hook(name: str):
    if os.environ.get("ADAPTERS_CRASH_AT") != CRASH_POINT or os.environ.get("ADAPTERS_CRASH_JOB") != name:
        return None

    def progress(done: int, total: int, what: str) -> None:
        if done > 0:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    return progress


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one job (see the module docstring). Never raises for a job's own failure."""
    from exporters.errors import ExportError, ValidationFailed
    from exporters.pipeline import run_merge
    from mora_core.errors import MoraCoreError
    from registry.errors import RegistryError
    from registry.jobs import this_owner

    started = time.perf_counter()
    result: dict[str, Any] = {"worker": this_owner()}
    try:
        opts = _options(spec["options"])
        opts.progress = _crash_hook(spec["name"])
        summary = run_merge(opts)
        artifact = (summary.get("artifact") or {}).get("ref")
        if spec.get("key"):  # recorded here, not by the runner: a runner killed now loses nothing
            from registry.api import Registry

            with Registry.open(opts.home, opts.db_url) as reg:
                reg.finish_job(spec["key"], spec["owner"], artifact)
        result.update(status="done", artifact=artifact, error=None)
    except (ExportError, MoraCoreError, RegistryError, ValidationFailed, OSError) as exc:
        result.update(status="failed", artifact=None, error=str(exc).strip().splitlines()[0] if str(exc) else
                      type(exc).__name__)
    except Exception as exc:  # a bug in a job must not take the batch down; say what it was
        result.update(status="failed", artifact=None,
                      error=f"internal error: {type(exc).__name__}: {str(exc).strip()[:200]}")
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result
