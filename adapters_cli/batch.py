"""`adapters batch PLAN`: run a plan of merge/export jobs locally or on Ray, cached by input digests."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from adapters_cli.common import EXIT_CHECK, emit_json, run_guarded, store_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("plan_file", metavar="PLAN", type=click.Path(path_type=Path))
@click.option("--executor", default="local", type=click.Choice(["local", "ray"]),
              help="local: a process pool on this machine; ray: one Ray task per job.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (default: start a local Ray for the run).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="At most N jobs at once (default: the CPUs available).")
@store_options
def batch(plan_file: Path, executor: str, ray_address: str | None, max_parallel: int | None,
          home: str | None, db_url: str | None, as_json: bool) -> None:
    """Run the jobs of PLAN (YAML or JSON); a job whose inputs did not change is `cached`.

    Each job is an `adapters merge`: adapters (references or folders), weights, base, to,
    output and merge options. Exit code 1 if any job failed.

    \b
    Example plan:
      defaults: {base: ./llama, to: safetensors}
      jobs:
        - {adapters: [team/mora@prod], output: out/mora}
        - {adapters: [team/mora@prod, ./lora], weights: [1, 0.5], to: onnx, output: out/both-onnx}
    \b
    Examples:
      adapters batch plan.yaml
      adapters batch plan.yaml --executor ray --max-parallel 4 --json
    """
    from exporters.batch.plan import load_plan
    from exporters.batch.runner import run_plan

    home_p = Path(home) if home else None
    live = not as_json and sys.stderr.isatty()

    def on_event(job, state, report) -> None:
        """On a TTY every state change; piped, only the final state of each job."""
        if as_json or (not live and state not in ("done", "cached", "failed")):
            return
        tail = ""
        if report is not None:
            tail = f"  {report.artifact or ''}"
            if report.seconds is not None:
                tail += f"  {report.seconds:.1f} s"
            if report.worker:
                tail += f"  {report.worker}"
            if report.error:
                tail = f"  {report.error}"
        click.echo(f"{state:<8} {job.name}{tail}", err=state == "failed" or live)

    def body() -> list:
        plan = load_plan(plan_file, home=home_p, db_url=db_url)
        return run_plan(plan, executor=executor, ray_address=ray_address, max_parallel=max_parallel,
                        home=home_p, db_url=db_url, on_event=on_event)

    reports = run_guarded(body)
    if as_json:
        emit_json({"jobs": [r.to_dict() for r in reports]})
    counts = {s: sum(r.status == s for r in reports) for s in ("done", "cached", "failed")}
    if not as_json:
        click.echo(f"{len(reports)} jobs: {counts['done']} done, {counts['cached']} cached, {counts['failed']} failed")
    if counts["failed"]:
        sys.exit(EXIT_CHECK)
