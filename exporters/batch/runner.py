"""Running a plan: keys, leases, the cache, the executor, and one report line per job.

For each job, in plan order, the runner computes its key and asks the registry for it:
- a done key whose artifact is still at the job's output and still verifies is `cached`
  (nothing is read but the digests, nothing is written);
- a key leased by a live runner elsewhere is waited for (then it is cached, or taken
  over if that runner died), so two runs of one plan never do a job twice;
- otherwise this runner holds the key's lease (renewed in the background while jobs run)
  and the job goes to the executor. Its output replaces an older output of the same job
  only if that one was written by `adapters batch` too; any other existing folder fails
  the job.
A job that fails (bad input, failed validation, a dead worker) is reported with its error
line; the others go on. A runner killed mid-run leaves its keys leased by a dead process:
the next run takes them over and runs those jobs again (nothing was registered for them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.batch.executors import EXECUTORS, run_local, run_ray
from exporters.batch.keys import job_key
from exporters.batch.plan import Job, Plan
from exporters.batch.worker import options_spec
from exporters.errors import ExportError

RENEW_SECONDS = 30.0
STATUSES = ("done", "cached", "failed")


@dataclass
class JobReport:
    """One line of `adapters batch --json`: status is done, cached or failed."""

    name: str
    key: str
    output: str
    status: str
    worker: str | None = None
    seconds: float | None = None
    artifact: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "output": self.output, "status": self.status,
                "worker": self.worker, "seconds": self.seconds, "artifact": self.artifact, "error": self.error}


EventFn = Callable[[Job, str, "JobReport | None"], None]  # (job, queued|running|waiting|done|cached|failed, report)


class _Renewer:
    """Renews this runner's leases every RENEW_SECONDS on its own registry handle, until stopped."""

    def __init__(self, home: Path | None, db_url: str | None, owner: str):
        self._home, self._db_url, self._owner = home, db_url, owner
        self.keys: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-renewer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        from registry.api import Registry

        with Registry.open(self._home, self._db_url) as reg:
            while not self._stop.wait(RENEW_SECONDS):
                if self.keys:
                    reg.renew_jobs(sorted(self.keys), self._owner)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def run_plan(plan: Plan, *, executor: str = "local", ray_address: str | None = None,
             max_parallel: int | None = None, home: Path | None = None, db_url: str | None = None,
             on_event: EventFn | None = None, poll_seconds: float = 1.0) -> list[JobReport]:
    """Run every job of `plan` (see the module docstring); reports in plan order."""
    from registry.api import Registry
    from registry.jobs import this_owner

    if executor not in EXECUTORS:
        raise ExportError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if max_parallel is not None and max_parallel < 1:
        raise ExportError(f"--max-parallel {max_parallel}: must be at least 1")
    event = on_event or (lambda job, state, report: None)
    owner = this_owner()
    reports: dict[int, JobReport] = {}
    renewer = _Renewer(home, db_url, owner)
    with Registry.open(home, db_url) as registry:
        keys = {job.index: job_key(job, registry) for job in plan.jobs}
        renewer.start()
        try:
            pending = list(plan.jobs)
            while pending:
                runnable, waiting = [], []
                for job in pending:
                    event(job, "queued", None)
                    verdict = _claim(registry, job, keys[job.index], owner)
                    if isinstance(verdict, JobReport):
                        reports[job.index] = verdict
                        event(job, verdict.status, verdict)
                    elif verdict == "busy":
                        waiting.append(job)
                        event(job, "waiting", None)
                    else:
                        runnable.append(job)
                renewer.keys.update(keys[j.index] for j in runnable)
                _execute(registry, runnable, keys, owner, executor, ray_address, max_parallel, event, reports)
                renewer.keys.difference_update(keys[j.index] for j in runnable)
                if waiting:
                    time.sleep(poll_seconds)
                pending = waiting
        finally:
            renewer.stop()
    return [reports[job.index] for job in plan.jobs]


def _claim(registry: Any, job: Job, key: str, owner: str) -> JobReport | str:
    """"run" (this runner holds the lease), "busy" (a live runner does), or a final report."""
    output = str(job.output)
    claim = registry.claim_job(key, output, owner)
    if claim.status == "cached":
        ref = f"artifact:{claim.artifact_id}"
        if Path(registry.artifact(ref).path) == job.output and not registry.check_artifact(ref):
            return JobReport(job.name, key, output, "cached", artifact=ref)
        claim = registry.claim_job(key, output, owner, reuse_done=False)  # gone or altered: redo
    if claim.status == "busy":
        return "busy"
    out = job.output
    if (out.exists() or out.is_symlink()) and registry.batch_output(output) is None:  # an empty folder too
        error = f"{out}: output exists and was not written by adapters batch; remove it or choose another output"
        registry.finish_job(key, owner, None, error)
        return JobReport(job.name, key, output, "failed", error=error)
    return "run"


def _execute(registry: Any, jobs: list[Job], keys: dict[int, str], owner: str, executor: str,
             ray_address: str | None, max_parallel: int | None, event: EventFn,
             reports: dict[int, JobReport]) -> None:
    if not jobs:
        return
    specs = [{"name": job.name, "key": keys[job.index], "owner": owner, "options": options_spec(job.options)}
             for job in jobs]
    for job in jobs:
        event(job, "running", None)
    results = run_local(specs, max_parallel) if executor == "local" else run_ray(specs, max_parallel, ray_address)
    for i, result in results:
        job, key = jobs[i], keys[jobs[i].index]
        error = result.get("error") if result.get("status") != "done" else None
        registry.finish_job(key, owner, result.get("artifact"), error)  # a no-op once the worker recorded it
        report = JobReport(job.name, key, str(job.output), "failed" if error else "done", worker=result.get("worker"),
                           seconds=result.get("seconds"), artifact=result.get("artifact"), error=error)
        reports[job.index] = report
        event(job, report.status, report)
