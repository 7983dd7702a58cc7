"""Where jobs run: a local process pool (the default) or Ray tasks.

Both take job specs (plain dicts for `worker.run_job`) and yield `(index, result)` as jobs
finish, in completion order. The Ray executor declares each task's CPU and memory needs
(estimated from the base's files, see `memory_bytes`) so Ray packs jobs onto nodes that
can hold them; without an address it starts a local Ray for the run and stops it after.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from exporters.batch.worker import run_job
from exporters.errors import ExportError

EXECUTORS = ("local", "ray")


def default_parallel() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def memory_bytes(options: dict[str, Any]) -> int:
    """A job's peak memory, from its base's weight bytes: the merge streams (about four times the
    largest tensor, bounded by the whole) + 400 MB; an ONNX export holds the model (1.5x + 1 GB)."""
    base = Path(options["base_dir"])
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors") if p.is_file())
    if options["target"] == "onnx":
        return int(1.5 * weights) + (1 << 30)
    return min(weights, 4 * _largest_tensor(base)) + 400 * (1 << 20)


def _largest_tensor(base: Path) -> int:
    from mora_core.safetensors_io import SafetensorsFile

    largest = 0
    for p in base.glob("*.safetensors"):
        try:
            largest = max([largest, *(t.nbytes for t in SafetensorsFile(p).tensors.values())])
        except Exception:  # an unreadable file fails the job itself, with its own message
            continue
    return largest


def run_local(specs: Sequence[dict[str, Any]], max_parallel: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Jobs in a pool of fresh processes (spawned: no state inherited from the runner's threads)."""
    workers = max(1, min(len(specs), max_parallel or default_parallel()))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(run_job, spec): i for i, spec in enumerate(specs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    yield i, fut.result()
                except Exception as exc:  # the worker process died (killed, out of memory)
                    yield i, {"status": "failed", "artifact": None, "worker": None, "seconds": None,
                              "error": f"worker process died ({type(exc).__name__})"}


def run_ray(specs: Sequence[dict[str, Any]], max_parallel: int | None,
            address: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each job a Ray task with `num_cpus=1` and its estimated memory; at most `max_parallel` at once."""
    try:
        import ray
    except ImportError:
        raise ExportError("--executor ray: the `ray` package is not installed (pip install ray)") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address:
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExportError(f"--ray-address {address}: cannot join the cluster "
                                  f"({str(exc).strip().splitlines()[0][:160]})") from None
        else:
            ray.init(num_cpus=max_parallel or default_parallel(), **kwargs)
        started = True
    try:
        task = ray.remote(run_job)
        limit = max(1, max_parallel or len(specs))
        queue = list(enumerate(specs))
        running: dict[Any, int] = {}
        while queue or running:
            while queue and len(running) < limit:
                i, spec = queue.pop(0)
                ref = task.options(num_cpus=1, memory=memory_bytes(spec["options"]),
                                   max_retries=0).remote(spec)
                running[ref] = i
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i = running.pop(ref)
                try:
                    yield i, ray.get(ref)
                except Exception as exc:  # the task's worker died (node lost, killed)
                    yield i, {"status": "failed", "artifact": None, "worker": None, "seconds": None,
                              "error": f"ray task failed ({type(exc).__name__})"}
    finally:
        if started:
            ray.shutdown()
