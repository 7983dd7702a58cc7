"""`adapters export --slots` and `adapters pack`: serve adapters unmerged from one base graph.

Thin commands: they build `exporters.serve_pipeline` options and print the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapters_cli.common import ProgressLine, complete_ref, emit_json, run_guarded, store_options

PROVIDERS = ["auto", "cpu", "cuda", "tensorrt"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", "base_dir", required=True,
              help="Base model folder (config.json + safetensors), or hf:ORG/NAME[@REVISION] from the "
                   "Hugging Face Hub (its commit is recorded).")
@click.option("--to", "target", required=True, type=click.Choice(["onnx"]), help="Output format.")
@click.option("--slots", "slots", required=True, multiple=True, metavar="ADAPTER", shell_complete=complete_ref,
              help="Adapter (folder or registry reference) whose modules get slots; repeat or list several.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (must not exist yet; appears only when validated).")
@click.option("--mixed", is_flag=True,
              help="Stack the adapters inside the graph; input adapter_index picks each row's adapter (-1 = base).")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "float16"]), help="Graph dtype.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--provider", default="auto", type=click.Choice(PROVIDERS), help="ONNX Runtime provider for validation.")
@click.option("--atol", type=float, default=None, help="Validation absolute tolerance (default per dtype).")
@click.option("--rtol", type=float, default=None, help="Validation relative tolerance (default per dtype).")
@click.option("--no-kv-cache", is_flag=True,
              help="Decoders: the plain signature (input_ids, attention_mask -> logits) without KV cache "
                   "or genai_config.json.")
@click.option("--allow-base-mismatch", is_flag=True,
              help="Accept registry versions pushed for another base than --base.")
@click.option("--register/--no-register", default=True, help="Record the graph as an artifact (default: yes).")
@click.argument("more", nargs=-1, metavar="[ADAPTER...]", shell_complete=complete_ref)
@store_options
def export(base_dir: str, target: str, slots: tuple[str, ...], out_dir: Path, mixed: bool, dtype: str,
           opset: int | None, provider: str, atol: float | None, rtol: float | None, no_kv_cache: bool,
           allow_base_mismatch: bool, register: bool, more: tuple[str, ...], home: str | None, db_url: str | None,
           as_json: bool) -> None:
    """Export the BASE model once with adapter slots (LoRA A/B, MoRA M) for the given adapters.

    Each ADAPTER is a PEFT folder or a registry reference. The graph has the inputs of a
    merged export; the adapter weights are overridable initializers that ONNX Runtime
    swaps per run from `.onnx_adapter` files (`adapters pack`). With --mixed the adapters
    are stacked inside and `adapter_index` picks one per batch row.

    \b
    Examples:
      adapters export --base ./llama --to onnx --slots team/lora:1 team/mora@prod -o ./llama-slots
      adapters export --base ./llama --to onnx --slots ./a ./b ./c --mixed -o ./llama-mixed
      adapters export --base hf:meta-llama/Llama-3.2-1B --to onnx --slots team/lora:1 -o ./llama-slots
    """
    from exporters.serve_pipeline import SlotsOptions, run_slots_export

    progress = ProgressLine(enabled=None if not as_json else False)  # stage names, elapsed seconds
    opts = SlotsOptions(adapters=[*slots, *more], base_dir=base_dir, out_dir=out_dir, mixed=mixed, dtype=dtype,
                        opset=opset, provider=provider, atol=atol, rtol=rtol, kv_cache=not no_kv_cache,
                        allow_base_mismatch=allow_base_mismatch, home=Path(home) if home else None,
                        db_url=db_url, register=register, on_stage=progress.stage)
    summary = run_guarded(lambda: run_slots_export(opts), progress)
    if as_json:
        emit_json(summary)
        return
    v = summary["validation"]
    rows: list[tuple[str, Any]] = [("output", summary["output"]),
                                   ("format", "onnx, mixed adapters" if summary["mixed"] else "onnx, adapter slots"),
                                   ("slots", f"{len(summary['slots'])} on "
                                             f"{len({s['module'] for s in summary['slots']})} modules"),
                                   ("validated", f"{v['provider']}: max abs {v['max_abs_diff']:.3g}, "
                                                 f"max rel {v['max_rel_diff']:.3g} (pass)"),
                                   ("kv cache", "yes" + (" (genai_config.json)" if not summary["mixed"] else "")
                                    if summary.get("kv_cache") else "no")]
    for a in summary["adapters"]:
        rows.append(("adapter", f"{a['position']}: {a['ref']}  {a['kind']}"))
    if summary.get("artifact"):
        rows.append(("artifact", summary["artifact"].get("ref")))
    _rows(rows)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("adapter", metavar="ADAPTER", shell_complete=complete_ref)
@click.option("--graph", "graph_dir", required=True, type=click.Path(path_type=Path),
              help="A slots graph folder (adapters export --slots).")
@click.option("-o", "--output", "out_file", required=True, type=click.Path(path_type=Path),
              help="The adapter file to write (FILE.onnx_adapter; must not exist).")
@click.option("--weight", type=float, default=1.0, help="Weight folded into the adapter (default 1).")
@click.option("--base", "base_dir", default=None,
              help="Base model folder or hf:ORG/NAME[@REVISION] (default: the one recorded in the graph's "
                   "export.json).")
@click.option("--provider", default="auto", type=click.Choice(PROVIDERS), help="ONNX Runtime provider for validation.")
@click.option("--atol", type=float, default=None, help="Validation absolute tolerance (default per dtype).")
@click.option("--rtol", type=float, default=None, help="Validation relative tolerance (default per dtype).")
@click.option("--allow-base-mismatch", is_flag=True,
              help="Accept a registry version pushed for another base than the graph's.")
@click.option("--register/--no-register", default=True, help="Record the file as an artifact (default: yes).")
@store_options
def pack(adapter: str, graph_dir: Path, out_file: Path, weight: float, base_dir: str | None, provider: str,
         atol: float | None, rtol: float | None, allow_base_mismatch: bool, register: bool, home: str | None,
         db_url: str | None, as_json: bool) -> None:
    """Write the ONNX Runtime adapter file of ADAPTER (folder or reference) for a slots graph.

    LoRA scaling and --weight are folded in; the file is validated on the graph against
    the unmerged PyTorch reference. Serve it with onnxruntime's LoraAdapter and
    RunOptions.add_active_adapter.

    \b
    Examples:
      adapters pack team/lora:1 --graph ./llama-slots -o lora1.onnx_adapter
      adapters pack ./my-mora --graph ./llama-slots -o mora.onnx_adapter --weight 0.5
    """
    from exporters.serve_pipeline import PackOptions, run_pack

    progress = ProgressLine(enabled=None if not as_json else False)  # stage names, elapsed seconds
    opts = PackOptions(adapter=adapter, graph_dir=graph_dir, out_file=out_file, weight=weight, base_dir=base_dir,
                       provider=provider, atol=atol, rtol=rtol, allow_base_mismatch=allow_base_mismatch,
                       home=Path(home) if home else None, db_url=db_url, register=register,
                       on_stage=progress.stage)

    summary = run_guarded(lambda: run_pack(opts), progress)
    if as_json:
        emit_json(summary)
        return
    v = summary["validation"]
    rows: list[tuple[str, Any]] = [("output", summary["output"]), ("adapter", summary["adapter"]["ref"]),
                                   ("weight", f"{summary['weight']:g}"),
                                   ("parameters", f"{len(summary['parameters'])} on {len(summary['modules'])} modules"),
                                   ("validated", f"{v['provider']}: max abs {v['max_abs_diff']:.3g} (pass)")]
    if summary.get("artifact"):
        rows.append(("artifact", summary["artifact"].get("ref")))
    if summary["graph"].get("artifact"):
        rows.append(("graph", summary["graph"]["artifact"]))
    _rows(rows)


def _rows(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
