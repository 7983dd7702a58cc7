"""`adapters merge`: fold adapters into a base model, write safetensors or validated ONNX.

This command is part of the composition root: it resolves adapter arguments (local PEFT
folders, or registry references materialised from the store), calls mora_core for the
merge and the ONNX exporter for graphs, and registers the result as an artifact with its
lineage. Heavy imports happen inside the command, never at import time of the CLI.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from registry.cli_common import ProgressLine, UserError, run_guarded

DTYPE_CHOICES = ["auto", "float16", "bfloat16", "float32"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
              help="Base model folder (config.json + safetensors, sharded or not).")
@click.option("--to", "target", required=True, type=click.Choice(["safetensors", "onnx"]),
              help="Output format.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (must not exist yet; appears only when complete).")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight per adapter, in order (default 1.0 each): W' = W + sum w_i dW_i.")
@click.option("--dtype", default="auto", type=click.Choice(DTYPE_CHOICES),
              help="Output dtype of floating tensors (auto keeps the base's; ONNX: float32 or float16).")
@click.option("--accumulate", default="float32", type=click.Choice(["float32", "float64"]),
              help="Accumulation dtype of the merge (cast once at the end).")
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help="Repack safetensors shards to at most SIZE (e.g. 2GB); default keeps the base's sharding.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--provider", default="auto", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime provider used for validation.")
@click.option("--atol", type=float, default=None, help="Validation absolute tolerance (default per dtype).")
@click.option("--rtol", type=float, default=None, help="Validation relative tolerance (default per dtype).")
@click.option("--no-validate", is_flag=True, help="Skip ONNX validation (the artifact is not registered).")
@click.option("--allow-base-mismatch", is_flag=True,
              help="Merge even if --base differs from the base recorded when an adapter was pushed.")
@click.option("--home", type=click.Path(path_type=Path), default=None, envvar="ADAPTERS_HOME",
              help="Registry home (for references and artifact registration).")
@click.option("--register/--no-register", default=True,
              help="Record the output as an artifact in the registry (default: yes).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def merge(adapters: tuple[str, ...], base_dir: Path, target: str, out_dir: Path, weights: tuple[float, ...],
          dtype: str, accumulate: str, max_shard_size: str | None, opset: int | None, provider: str,
          atol: float | None, rtol: float | None, no_validate: bool, allow_base_mismatch: bool,
          home: Path | None, register: bool, as_json: bool) -> None:
    """Merge ADAPTER(s) into the model at --base and write it --to safetensors or onnx.

    Each ADAPTER is a local PEFT folder (LoRA, DoRA, rsLoRA or MoRA) or a registry
    reference (name, name:3, name@prod, name@sha256:<prefix>).

    \b
    Examples:
      adapters merge ./my-mora --base ./llama-7b --to safetensors -o ./merged
      adapters merge team/mora@prod team/lora:2 --weight 1 --weight 0.5 \\
          --base ./llama-7b --to onnx -o ./llama-merged-onnx
    """
    run_guarded(lambda: _merge(
        adapters, base_dir, target, out_dir, weights, dtype, accumulate, max_shard_size, opset, provider,
        atol, rtol, no_validate, allow_base_mismatch, home, register, as_json))


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    t = text.strip().lower()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise UserError(f"--max-shard-size {text!r} is not a size like 2GB or 500MB") from None


def _merge(adapter_args, base_dir, target, out_dir, weights, dtype, accumulate, max_shard_size, opset,
           provider, atol, rtol, no_validate, allow_base_mismatch, home, register, as_json) -> None:
    started = time.perf_counter()
    if weights and len(weights) != len(adapter_args):
        raise UserError(f"{len(adapter_args)} adapters but {len(weights)} --weight values (give none or one each)")
    weight_list = list(weights) if weights else [1.0] * len(adapter_args)
    if target == "onnx" and dtype not in ("auto", "float32", "float16"):
        raise UserError(f"--dtype {dtype} is not supported for ONNX (float32 or float16)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: output already exists; choose another -o or remove it")
    shard_bytes = _parse_size(max_shard_size)

    from exporters.inputs import resolve_adapters

    resolved = resolve_adapters(adapter_args, base_dir, home, allow_base_mismatch)
    loaded = [r.adapter for r in resolved]
    on_tty = not as_json and sys.stderr.isatty()
    progress = ProgressLine(on_tty) if target == "safetensors" else ProgressLine(on_tty, verb="step", unit="steps")

    if target == "safetensors":
        from mora_core.merge import merge_folder

        report = merge_folder(base_dir, loaded, out_dir, weight_list, dtype=dtype, accumulate=accumulate,
                              max_shard_bytes=shard_bytes, progress=progress.update).to_dict()
        progress.close()
        summary: dict[str, Any] = {"to": "safetensors", **report}
    else:
        from exporters.onnx_export import export_merged_onnx

        summary = {"to": "onnx", **export_merged_onnx(
            base_dir, loaded, weight_list, out_dir, dtype="float32" if dtype == "auto" else dtype,
            opset=opset, provider=provider, atol=atol, rtol=rtol, validate=not no_validate,
            accumulate=accumulate, progress=progress.update)}
        progress.close()
    summary["adapters"] = [r.describe(w) for r, w in zip(resolved, weight_list)]

    effective_dtype = summary.get("dtype", dtype) if target == "onnx" else dtype
    registrable = register and (target == "safetensors" or not no_validate)
    if registrable:
        from exporters.inputs import register_output

        summary["artifact"] = register_output(
            home, target, out_dir, base_dir, resolved, weight_list, effective_dtype, accumulate, summary)
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_human(summary)


def _print_human(s: dict[str, Any]) -> None:
    rows = [("output", s.get("output")), ("format", s["to"])]
    if s["to"] == "safetensors":
        rows += [("tensors", f"{s['tensors_merged']} merged of {s['tensors_total']} ({s['shards']} shard(s))"),
                 ("dtype", s["dtype"]),
                 ("time", f"{s['seconds']:.2f} s, peak RSS {s['peak_rss_mb']:.0f} MB")]
    else:
        v = s.get("validation") or {}
        if v:
            rows.append(("validated", f"{v.get('provider')}: max abs {v.get('max_abs_diff'):.3g}, "
                                      f"max rel {v.get('max_rel_diff'):.3g} ({'pass' if v.get('passed') else 'FAIL'})"))
        else:
            rows.append(("validated", "no (--no-validate)"))
    if s.get("untied"):
        rows.append(("untied", ", ".join(f"{k} (from {v})" for k, v in s["untied"].items())))
    for a in s["adapters"]:
        rows.append(("adapter", f"{a['ref']}  weight {a['weight']:g}  {a['kind']}"))
    if s.get("artifact"):
        rows.append(("artifact", s["artifact"].get("ref")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


