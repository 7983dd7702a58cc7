"""`adapters generate OUT (--prompt TEXT | --ids 1,2,3)`: text from an exported decoder, no torch.

Runs `exporters.generate` (onnxruntime-genai, or our ONNX Runtime loop where genai
cannot run the folder) through the graph's KV cache. Greedy unless a sampling option is
given. On a terminal the text streams as it is generated; `--json` prints one object.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from adapters_cli.common import (
    UserError,
    blob_url,
    complete_ref,
    emit_json,
    parse_ids,
    run_guarded,
    store_options,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path), metavar="OUT")
@click.option("--prompt", default=None, help="Prompt text (needs tokenizer.json in OUT).")
@click.option("--ids", default=None, help="Prompt token ids, comma separated (e.g. 1,2,3).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Generate at most this many tokens (fewer at an end-of-sequence id or the context end).")
@click.option("--temperature", type=float, default=None,
              help="Sample with this temperature, a finite number >= 0 (default, and 0: greedy).")
@click.option("--top-k", type=click.IntRange(1, 2**31 - 1), default=None,
              help="Sample among the K most likely tokens.")
@click.option("--top-p", type=float, default=None,
              help="Sample from the smallest set of tokens whose probability reaches P, in (0, 1].")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=None,
              help="Random seed for sampling (reproducible runs).")
@click.option("--provider", default="auto", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime execution provider.")
@click.option("--engine", default="auto", type=click.Choice(["auto", "genai", "ort"]),
              help="onnxruntime-genai, or our ONNX Runtime loop (auto: genai when the folder allows it).")
@click.option("--adapter", default=None, metavar="FILE.onnx_adapter|artifact:N|REF", shell_complete=complete_ref,
              help="Slots graphs: the adapter active while generating, an `adapters pack` file (or its registered "
                   "artifact:N), or an adapter folder or registry reference packed (and validated) for OUT first.")
@store_options
def generate(model: Path, prompt: str | None, ids: str | None, max_new_tokens: int, temperature: float | None,
             top_k: int | None, top_p: float | None, seed: int | None, provider: str, engine: str,
             adapter: str | None, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Generate text with the exported decoder in OUT (greedy unless a sampling option is given).

    \b
    Examples:
      adapters generate ./merged-onnx --prompt "The capital of France is" --max-new-tokens 20
      adapters generate ./merged-onnx --ids 1,15043,3186 --temperature 0.8 --top-p 0.9 --seed 1 --json
      adapters generate ./llama-slots --adapter ./mora.onnx_adapter --prompt "Hello"
      adapters generate ./llama-slots --adapter artifact:12 --prompt "Hello"
    """
    run_guarded(lambda: _generate(model, prompt, ids, max_new_tokens, temperature, top_k, top_p, seed, provider,
                                  engine, adapter, home, db_url, as_json))


def _generate(model: Path, prompt: str | None, ids: str | None, max_new_tokens: int, temperature: float | None,
              top_k: int | None, top_p: float | None, seed: int | None, provider: str, engine: str,
              adapter: str | None, home: str | None, db_url: str | None, as_json: bool) -> None:
    from exporters.generate import Sampling, generate, model_info
    from exporters.text_tokenizer import TextTokenizer

    if (prompt is None) == (ids is None):
        raise UserError("give exactly one of --prompt or --ids")
    sampling = Sampling(temperature, top_k, top_p, seed)
    sampling.check()  # options first: nothing is read for a bad value
    info = model_info(model)
    tok = TextTokenizer.from_folder(info.folder)
    if prompt is not None:
        if tok is None:
            raise UserError(f"{info.folder}: no tokenizer.json to encode --prompt; use --ids")
        prompt_ids = tok.encode(prompt).ids
        if not prompt_ids:
            raise UserError("--prompt encodes to no tokens")
    else:
        prompt_ids = parse_ids(ids or "")
    with tempfile.TemporaryDirectory(prefix="adapters-generate-") as work:
        adapter_file = None if adapter is None else _adapter_file(adapter, info.folder, Path(work), home, db_url)
        stream = _Stream(tok, enabled=not as_json and sys.stdout.isatty())
        result = generate(info.folder, prompt_ids, max_new_tokens, sampling,
                          provider=provider, engine=engine, on_token=stream.token, adapter=adapter_file)
    text = tok.decode(result.tokens) if tok is not None else None
    if as_json:
        emit_json({**result.to_dict(), "adapter": adapter, "text": text, "prompt_ids": prompt_ids})
        return
    if stream.enabled:
        stream.finish()
    else:
        click.echo(text if text is not None else ",".join(map(str, result.tokens)))
    click.echo(f"[{result.engine} on {result.provider}: {len(result.tokens)} tokens ({result.stopped}), first after "
               f"{result.time_to_first_token_s:.3f} s, {result.tokens_per_s:.1f} tokens/s]", err=True)


def _adapter_file(adapter: str, graph_dir: Path, work: Path, home: str | None, db_url: str | None) -> Path:
    """`--adapter`: an existing file is used as it is (checked against the graph's slots by
    `exporters.generate`); `artifact:N` (or `artifact@sha256:P`) is the file of a registered
    `adapters pack` output, re-hashed against its record; a folder or a registry reference
    is packed for `graph_dir` into `work` first, as `adapters pack` does (validated against
    the unmerged reference; this path imports torch)."""
    from exporters.generate import check_slots_graph, model_info

    check_slots_graph(model_info(graph_dir))  # before any packing
    path = Path(adapter)
    if path.is_file() or (path.exists() and not path.is_dir()):
        return path
    if adapter.endswith(".onnx_adapter"):
        raise UserError(f"--adapter {adapter}: no such file")
    if adapter.startswith(("artifact:", "artifact@")):
        return _artifact_file(adapter, home, db_url)
    from exporters.serve_pipeline import PackOptions, run_pack

    out = work / "adapter.onnx_adapter"
    run_pack(PackOptions(adapter=adapter, graph_dir=graph_dir, out_file=out, register=False,
                         home=Path(home) if home else None, db_url=db_url))
    return out


def _artifact_file(ref: str, home: str | None, db_url: str | None) -> Path:
    """The file of a registered adapter file artifact (kind `onnx_adapter`), its bytes those recorded."""
    from exporters.serve_pipeline import KIND_ADAPTER
    from registry.api import Registry

    with Registry.open(home=home, db_url=db_url, blob_url=blob_url(), create=False) as reg:
        info = reg.artifact(ref)  # RegistryError (exit 2) for an unknown or malformed reference
        if info.kind != KIND_ADAPTER:
            raise UserError(f"--adapter {ref}: a {info.kind} artifact, not an adapter file "
                            f"({KIND_ADAPTER}, written by adapters pack)")
        problems = reg.check_artifact(info.ref)
    if problems:
        raise UserError(f"--adapter {ref}: {problems[0]}")
    return Path(info.path)


class _Stream:
    """Prints the text as tokens arrive (decoding the whole tail each time: multi-byte pieces)."""

    def __init__(self, tok, enabled: bool):
        self.tok, self.enabled = tok, enabled
        self.ids: list[int] = []
        self.shown = ""

    def token(self, token_id: int) -> None:
        if not self.enabled:
            return
        self.ids.append(token_id)
        if self.tok is None:
            click.echo(("," if len(self.ids) > 1 else "") + str(token_id), nl=False)
            return
        text = self.tok.decode(self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            click.echo(text[len(self.shown):], nl=False)
            self.shown = text

    def finish(self) -> None:
        if self.tok is not None:
            text = self.tok.decode(self.ids)
            if text.startswith(self.shown):
                click.echo(text[len(self.shown):], nl=False)
        click.echo("")
