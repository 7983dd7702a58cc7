"""`adapters generate OUT (--prompt TEXT | --ids 1,2,3)`: text from an exported decoder, no torch.

Runs `exporters.generate` (onnxruntime-genai, or our ONNX Runtime loop where genai
cannot run the folder) through the graph's KV cache. Greedy unless a sampling option is
given. On a terminal the text streams as it is generated; `--json` prints one object.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from adapters_cli.common import UserError, emit_json, parse_ids, run_guarded, store_options


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
@store_options
def generate(model: Path, prompt: str | None, ids: str | None, max_new_tokens: int, temperature: float | None,
             top_k: int | None, top_p: float | None, seed: int | None, provider: str, engine: str,
             home: str | None, db_url: str | None, as_json: bool) -> None:
    """Generate text with the exported decoder in OUT (greedy unless a sampling option is given).

    \b
    Examples:
      adapters generate ./merged-onnx --prompt "The capital of France is" --max-new-tokens 20
      adapters generate ./merged-onnx --ids 1,15043,3186 --temperature 0.8 --top-p 0.9 --seed 1 --json
    """
    run_guarded(lambda: _generate(model, prompt, ids, max_new_tokens, temperature, top_k, top_p, seed, provider,
                                  engine, as_json))


def _generate(model: Path, prompt: str | None, ids: str | None, max_new_tokens: int, temperature: float | None,
              top_k: int | None, top_p: float | None, seed: int | None, provider: str, engine: str,
              as_json: bool) -> None:
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
    stream = _Stream(tok, enabled=not as_json and sys.stdout.isatty())
    result = generate(info.folder, prompt_ids, max_new_tokens, sampling,
                      provider=provider, engine=engine, on_token=stream.token)
    text = tok.decode(result.tokens) if tok is not None else None
    if as_json:
        emit_json({**result.to_dict(), "text": text, "prompt_ids": prompt_ids})
        return
    if stream.enabled:
        stream.finish()
    else:
        click.echo(text if text is not None else ",".join(map(str, result.tokens)))
    click.echo(f"[{result.engine} on {result.provider}: {len(result.tokens)} tokens ({result.stopped}), first after "
               f"{result.time_to_first_token_s:.3f} s, {result.tokens_per_s:.1f} tokens/s]", err=True)


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
