"""A batch plan: jobs of `adapters merge`, read from YAML or JSON and validated before anything runs.

    defaults:                 # optional: fields every job starts from
      base: ./llama
      to: safetensors
    jobs:
      - name: mora-prod       # optional; default: the output path
        adapters: [team/mora@prod, ./lora]
        weights: [1, 0.5]
        output: out/llama-mora
        to: onnx               # and any option of `adapters merge`: dtype, accumulate,
        provider: cpu          # max_shard_size, opset, provider, atol, rtol, validate,
                               # allow_base_mismatch

Relative paths are relative to the plan file. Every problem is a `PlanError` whose one line
names the plan, the job and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.errors import ExportError
from exporters.pipeline import MergeOptions, parse_size

MAX_PLAN_BYTES = 4 << 20
MAX_JOBS = 10_000


class PlanError(ExportError):
    """A plan that cannot run: one line naming the plan, the job and the field."""


def _str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (check, what it must be)
FIELDS: dict[str, tuple[Any, str]] = {
    "name": (_str, "a non-empty string"),
    "adapters": (lambda v: isinstance(v, list) and bool(v) and all(_str(a) for a in v),
                 "a non-empty list of references or folders"),
    "weights": (lambda v: isinstance(v, list) and all(_num(w) for w in v), "a list of finite numbers"),
    "base": (_str, "a base model folder"),
    "to": (lambda v: v in ("safetensors", "onnx"), "safetensors or onnx"),
    "output": (_str, "an output folder"),
    "dtype": (_str, "a dtype name"),
    "accumulate": (lambda v: v in ("float32", "float64"), "float32 or float64"),
    "max_shard_size": (lambda v: (_str(v) or isinstance(v, int)) and not isinstance(v, bool), "a size like 2GB"),
    "opset": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "provider": (lambda v: v in ("auto", "cpu", "cuda", "tensorrt"), "auto, cpu, cuda or tensorrt"),
    "atol": (lambda v: _num(v) and v >= 0, "a non-negative number"),
    "rtol": (lambda v: _num(v) and v >= 0, "a non-negative number"),
    "validate": (lambda v: isinstance(v, bool), "true or false"),
    "allow_base_mismatch": (lambda v: isinstance(v, bool), "true or false"),
}
REQUIRED = ("adapters", "base", "to", "output")


@dataclass
class Job:
    """One job of a plan: its name, its position, and the merge it runs."""

    index: int
    name: str
    options: MergeOptions

    @property
    def output(self) -> Path:
        return Path(self.options.out_dir)

    def where(self) -> str:
        return f"job {self.index + 1} ({self.name})"


@dataclass
class Plan:
    path: Path
    jobs: list[Job]


def _read(path: Path) -> Any:
    try:
        if not path.is_file():
            raise PlanError(f"{path}: no such plan file")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise PlanError(f"{path}: larger than {MAX_PLAN_BYTES >> 20} MiB; a plan is a short list of jobs")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot be read ({exc})") from None
    if path.suffix.lower() == ".json":
        from mora_core.safe_io import parse_json

        return parse_json(text, path, PlanError)  # the one strict JSON reader
    import yaml

    try:
        return yaml.safe_load(text)  # JSON is YAML too
    except (yaml.YAMLError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"{path}: not valid YAML ({first})") from None


def load_plan(path: str | Path, *, home: Path | None = None, db_url: str | None = None) -> Plan:
    """Read and validate a plan; `PlanError` on the first problem, before anything runs."""
    path = Path(path)
    doc = _read(path)
    if isinstance(doc, list):
        doc = {"jobs": doc}
    if not isinstance(doc, dict):
        raise PlanError(f"{path}: a plan is a mapping with `jobs` (and optional `defaults`)")
    unknown = sorted(set(doc) - {"jobs", "defaults"})
    if unknown:
        raise PlanError(f"{path}: unknown top-level field {unknown[0]!r} (expected jobs, defaults)")
    defaults = doc.get("defaults") or {}
    raw_jobs = doc.get("jobs")
    if not isinstance(defaults, dict):
        raise PlanError(f"{path}: defaults: must be a mapping of job fields")
    if "name" in defaults or "output" in defaults:
        raise PlanError(f"{path}: defaults: 'name' and 'output' belong to each job")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        raise PlanError(f"{path}: jobs: must be a non-empty list")
    if len(raw_jobs) > MAX_JOBS:
        raise PlanError(f"{path}: {len(raw_jobs)} jobs; at most {MAX_JOBS} per plan")
    root = path.resolve().parent
    jobs = [_job(path, root, i, defaults, raw) for i, raw in enumerate(raw_jobs)]
    seen: dict[Path, Job] = {}
    names: dict[str, Job] = {}
    for job in jobs:
        out = job.output
        if out in seen:
            raise PlanError(f"{path}: {job.where()}: field 'output': {out} is also the output of "
                            f"{seen[out].where()}")
        seen[out] = job
        if job.name in names:
            raise PlanError(f"{path}: {job.where()}: field 'name': {job.name!r} is also the name of "
                            f"{names[job.name].where()}")
        names[job.name] = job
    _check_inputs(path, jobs, home, db_url)
    return Plan(path, jobs)


def _job(path: Path, root: Path, index: int, defaults: dict, raw: Any) -> Job:
    where = f"{path}: job {index + 1}"
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: must be a mapping of fields")
    fields = {**defaults, **raw}
    name = fields.get("name") if _str(fields.get("name")) else None
    if name is not None:
        where = f"{where} ({name})"
    for key, value in fields.items():
        if key not in FIELDS:
            raise PlanError(f"{where}: unknown field {key!r} (known: {', '.join(sorted(FIELDS))})")
        check, what = FIELDS[key]
        if not check(value):
            raise PlanError(f"{where}: field {key!r}: {value!r} is not {what}")
    for key in REQUIRED:
        if key not in fields:
            raise PlanError(f"{where}: field {key!r} is missing")

    def local(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else root / q

    adapters = [str(local(a)) if local(a).is_dir() else a for a in fields["adapters"]]
    out = local(fields["output"]).resolve()
    try:
        shard = parse_size(fields["max_shard_size"]) if "max_shard_size" in fields else None
    except ExportError as exc:
        raise PlanError(f"{where}: field 'max_shard_size': {exc}") from None
    opts = MergeOptions(
        adapters=adapters, base_dir=local(fields["base"]), target=fields["to"], out_dir=out,
        weights=[float(w) for w in fields["weights"]] if "weights" in fields else None,
        dtype=fields.get("dtype", "auto"), accumulate=fields.get("accumulate", "float32"),
        max_shard_bytes=shard, opset=fields.get("opset"), provider=fields.get("provider", "auto"),
        atol=fields.get("atol"), rtol=fields.get("rtol"), validate=fields.get("validate", True),
        allow_base_mismatch=fields.get("allow_base_mismatch", False), replace_output=True)
    try:
        opts.check()
    except ExportError as exc:
        raise PlanError(f"{where}: {exc}") from None
    return Job(index, name or str(out), opts)


def _check_inputs(path: Path, jobs: list[Job], home: Path | None, db_url: str | None) -> None:
    """Every base folder exists and every adapter is a folder or a reference the registry knows."""
    from registry.errors import RegistryError

    registry = None
    try:
        for job in jobs:
            if not Path(job.options.base_dir).is_dir():
                raise PlanError(f"{path}: {job.where()}: field 'base': {job.options.base_dir} is not a folder")
            for arg in job.options.adapters:
                if Path(arg).is_dir():
                    continue
                if registry is None:
                    from registry.api import Registry

                    registry = Registry.open(home, db_url)
                    job.options.home, job.options.db_url = home, db_url
                try:
                    registry.resolve(arg)
                except RegistryError as exc:
                    raise PlanError(f"{path}: {job.where()}: field 'adapters': {arg}: {exc}") from None
    finally:
        if registry is not None:
            registry.close()
    for job in jobs:
        job.options.home, job.options.db_url = home, db_url
