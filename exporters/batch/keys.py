"""A job's key: the digest of everything its output depends on.

    key = sha256(canonical({adapters: [version digest | folder file digests, ...],
                            base: {file: digest}, recipe: {...}, tools: {...}}))

Registry references contribute their version digest (content-addressed, immutable); folders
the digests of their files; the base the digests of its weight files, index and config.json;
the recipe every option that changes the bytes written (target, weights, dtypes, sharding,
opset, validation settings) and the output path; the tools their versions. Two runs of the
same plan on unchanged inputs compute the same keys, and any change to an input changes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from exporters.batch.plan import Job

BASE_FILES = (".safetensors", ".json")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _files(folder: Path, suffixes: tuple[str, ...] | None, registry: Any) -> dict[str, str]:
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and (suffixes is None or p.name.endswith(suffixes)))
    return registry.file_digests(paths)


def job_key(job: Job, registry: Any) -> str:
    """`sha256:<hex>` of the job's inputs (see the module docstring); `registry` resolves references."""
    from exporters.recipe import tool_versions

    o = job.options
    adapters = []
    for arg in o.adapters:
        p = Path(arg)
        if p.is_dir():
            adapters.append({"folder": _files(p, None, registry)})
        else:
            adapters.append({"version": registry.resolve(arg).digest})
    recipe = {"to": o.target, "weights": o.weight_list(), "dtype": o.dtype, "accumulate": o.accumulate,
              "max_shard_bytes": o.max_shard_bytes, "output": str(Path(o.out_dir).resolve())}
    if o.target == "onnx":
        recipe.update(opset=o.opset, provider=o.provider, atol=o.atol, rtol=o.rtol, validate=o.validate)
    body = {"adapters": adapters, "base": _files(Path(o.base_dir), BASE_FILES, registry), "recipe": recipe,
            "tools": tool_versions()}
    return "sha256:" + hashlib.sha256(_canonical(body).encode()).hexdigest()
