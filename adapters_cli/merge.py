"""`adapters merge`: fold adapters into a base model, write safetensors or validated ONNX.

A thin command: it turns the options into an `exporters.pipeline.MergeOptions` and prints
the summary `run_merge` returns. Heavy imports happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapters_cli.common import (
    ProgressLine,
    SizeType,
    blob_url,
    complete_ref,
    emit_json,
    run_guarded,
    store_options,
)

DTYPE_CHOICES = ["auto", "float16", "bfloat16", "float32", "int4"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...", shell_complete=complete_ref)
@click.option("--base", "base_dir", required=True,
              help="Base model folder (config.json + safetensors, sharded or not), or "
                   "hf:ORG/NAME[@REVISION] from the Hugging Face Hub (its commit is recorded).")
@click.option("--to", "target", required=True, type=click.Choice(["safetensors", "onnx"]),
              help="Output format.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder: a new path (an existing empty folder is refused too); appears only when complete.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight per adapter, in order (default 1.0 each): W' = W + sum w_i dW_i.")
@click.option("--dtype", default="auto", type=click.Choice(DTYPE_CHOICES),
              help="Output dtype of floating tensors (auto keeps the base's; ONNX: float32, float16, or int4 "
                   "MatMulNBits weights, block 32).")
@click.option("--accumulate", default="float32", type=click.Choice(["float32", "float64"]),
              help="Accumulation dtype of the merge (cast once at the end).")
@click.option("--max-shard-size", "max_shard_bytes", default=None, type=SizeType(), metavar="SIZE",
              help="Repack safetensors shards to at most SIZE (e.g. 2GB); default keeps the base's sharding.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--provider", default="auto", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime provider used for validation.")
@click.option("--atol", type=float, default=None, help="Validation absolute tolerance (default per dtype).")
@click.option("--rtol", type=float, default=None, help="Validation relative tolerance (default per dtype).")
@click.option("--no-validate", is_flag=True, help="Skip ONNX validation (the artifact is not registered).")
@click.option("--no-kv-cache", is_flag=True,
              help="Decoders: export the plain graph (input_ids, attention_mask -> logits) without KV cache "
                   "or genai_config.json.")
@click.option("--graph-writer", default="auto", type=click.Choice(["auto", "fused", "torch"]),
              help="ONNX decoders with a KV cache: auto writes float32/int4 Llama/Mistral/Qwen2 graphs with ONNX "
                   "Runtime's fused ops (exporters.fused_decoder) and traces the rest with torch.onnx (float16 "
                   "included); fused or torch forces one.")
@click.option("--allow-base-mismatch", is_flag=True,
              help="Merge even if --base differs from the base recorded when an adapter was pushed.")
@click.option("--register/--no-register", default=True,
              help="Record the output as an artifact in the registry (default: yes).")
@store_options
def merge(adapters: tuple[str, ...], base_dir: str, target: str, out_dir: Path, weights: tuple[float, ...],
          dtype: str, accumulate: str, max_shard_bytes: int | None, opset: int | None, provider: str,
          atol: float | None, rtol: float | None, no_validate: bool, no_kv_cache: bool, graph_writer: str,
          allow_base_mismatch: bool,
          register: bool, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Merge ADAPTER(s) into the model at --base and write it --to safetensors or onnx.

    Each ADAPTER is a local PEFT folder (LoRA, DoRA, rsLoRA or MoRA) or a registry
    reference (name, name:3, name@prod, name@sha256:<prefix>).

    \b
    Examples:
      adapters merge ./my-mora --base ./llama-7b --to safetensors -o ./merged
      adapters merge team/mora@prod team/lora:2 --weight 1 --weight 0.5 \\
          --base ./llama-7b --to onnx -o ./llama-merged-onnx
    """
    from exporters.pipeline import MergeOptions, run_merge
    from registry.hub import is_hub_ref

    # stages with their elapsed time on a TTY (quiet when piped or --json); bytes while merging safetensors
    progress = ProgressLine(enabled=None if not as_json else False)
    opts = MergeOptions(
        adapters=list(adapters), base_dir=base_dir if is_hub_ref(base_dir) else Path(base_dir), target=target, out_dir=out_dir, weights=list(weights) or None,
        dtype=dtype, accumulate=accumulate, max_shard_bytes=max_shard_bytes, opset=opset, provider=provider,
        atol=atol, rtol=rtol, validate=not no_validate, kv_cache=not no_kv_cache, graph_writer=graph_writer,
        allow_base_mismatch=allow_base_mismatch,
        home=Path(home) if home else None, db_url=db_url, blob_url=blob_url(), register=register,
        registry_process=True,  # this process has not imported the registry: open it beside torch's import
        progress=progress.update if target == "safetensors" else None, on_stage=progress.stage)
    summary = run_guarded(lambda: run_merge(opts), progress)
    if as_json:
        emit_json(summary)
    else:
        _print_human(summary)


def _print_human(s: dict[str, Any]) -> None:
    rows = [("output", s.get("output")), ("format", s["to"])]
    if s.get("base"):
        rows.append(("base", f"hf:{s['base']['repo']}@{s['base']['commit']}"))
    if s["to"] == "safetensors":
        rows += [("tensors", f"{s['tensors_changed']} changed of {s['tensors_total']} "
                             f"({s['tensors_merged']} merged, {s['shards']} shard(s))"),
                 ("max |dW|", f"{s['max_abs_delta']:.4g}" + (f" ({s['max_abs_delta_tensor']})"
                                                           if s.get("max_abs_delta_tensor") else "")),
                 ("dtype", s["dtype"] + (" (auto: kept from the base)" if s.get("dtype_requested") == "auto" else "")),
                 ("time", f"{s['seconds']:.2f} s, peak RSS {s['peak_rss_mb']:.0f} MB")]
    else:
        v = s.get("validation") or {}
        if v:
            rows.append(("validated", f"{'pass' if v.get('passed') else 'FAIL'} on {v.get('provider')}, "
                                      f"|onnx - ref| <= {v.get('atol'):g} + {v.get('rtol'):g}*|ref|"))
            for c in (v.get("comparisons") or {}).values():  # each comparison named; <= 1x the tolerance passes
                rows.append(("", f"vs {c['name']}: max abs {c['max_abs_diff']:.3g}, "
                                 f"worst {c['worst_ratio']:.3g}x the tolerance"))
        else:
            rows.append(("validated", "no (--no-validate)"))
        gen = (v.get("comparisons") or {}).get("generation")
        if gen:
            rows.append(("generation", f"prefill + {gen['steps']} greedy steps through the KV cache: max abs "
                                       f"{gen['max_abs_diff']:.3g}, near-ties {gen['near_ties']}"))
        rows.append(("kv cache", "yes (genai_config.json)" if s.get("kv_cache") else "no"))
    if s.get("untied"):
        rows.append(("untied", ", ".join(f"{k} (from {v})" for k, v in s["untied"].items())))
    for a in s["adapters"]:
        rows.append(("adapter", f"{a['ref']}  weight {a['weight']:g}  {a['kind']}"))
    if s.get("artifact"):
        rows.append(("artifact", s["artifact"].get("ref")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


