"""`adapters run OUT --ids 1,2,3 | --text "..."`: proof that an exported graph serves.

Loads `OUT/model.onnx` in ONNX Runtime (no torch), feeds one sequence and prints the
next-token prediction (causal LMs) or a summary of the mean-pooled embedding (encoders),
with the provider that really ran. `--text` needs the tokenizer files that the export
copied from the base folder; `--ids` needs nothing.

The graph gets what the tokenizer really returns: its attention mask (a tokenizer that
pads to a fixed length marks the padding with 0s, and the embedding is pooled over real
tokens only), its token type ids (BERT graphs take them), and on KV-cache graphs an
empty past with position ids. An id outside the vocabulary is one error line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapters_cli.common import UserError, emit_json, parse_ids, run_guarded, store_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path), metavar="OUT")
@click.option("--text", default=None, help="Input text (needs the tokenizer files in OUT).")
@click.option("--ids", default=None, help="Input token ids, comma separated (e.g. 1,2,3).")
@click.option("--provider", default="auto", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime execution provider.")
@click.option("--top-k", default=5, type=click.IntRange(1, 100), help="Candidates shown for the next token.")
@store_options
def run(model: Path, text: str | None, ids: str | None, provider: str, top_k: int, home: str | None,
        db_url: str | None, as_json: bool) -> None:
    """Run the ONNX export in OUT on one input: next token (LM) or embedding summary (encoder).

    \b
    Examples:
      adapters run ./merged-onnx --ids 1,15043,3186
      adapters run ./merged-onnx --text "The capital of France is" --json
    """
    run_guarded(lambda: _run(model, text, ids, provider, top_k, as_json))


def _graph_path(model: Path) -> tuple[Path, dict[str, Any]]:
    """The graph to load and the export's recipe, read under the folder rule (see exporters.export_folder)."""
    from exporters.export_folder import graph_and_recipe

    return graph_and_recipe(model)


class _Tokenizer:
    """encode (ids, attention mask, token type ids) and decode, over tokenizer.json or transformers."""

    def __init__(self, encode, decode):
        self.encode, self.decode = encode, decode


def _tokenizer(folder: Path, allow_transformers: bool) -> _Tokenizer | None:
    from exporters.text_tokenizer import Encoded, TextTokenizer

    tok = TextTokenizer.from_folder(folder)
    if tok is not None:
        return _Tokenizer(tok.encode, tok.decode)
    if not allow_transformers:  # transformers imports torch: only when --text needs it
        return None
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:
        return None

    def encode(text: str) -> Encoded:
        enc = hf(text)
        ids = list(enc["input_ids"])
        return Encoded(ids, list(enc.get("attention_mask", [1] * len(ids))),
                       list(enc.get("token_type_ids", [0] * len(ids))))

    return _Tokenizer(encode, lambda ids: hf.decode(ids))


def _vocab_size(session, folder: Path, out_name: str) -> int | None:
    """The graph's vocabulary: the logits' last dimension, else config.json's vocab_size.

    config.json is read under the folder rule and by the strict JSON reader.
    """
    meta = next(o for o in session.get_outputs() if o.name == out_name)
    if out_name == "logits" and isinstance(meta.shape[-1], int):
        return int(meta.shape[-1])
    from exporters.export_folder import config_vocab_size

    return config_vocab_size(folder)


def _run(model: Path, text: str | None, ids: str | None, provider: str, top_k: int, as_json: bool) -> None:
    import numpy as np

    from exporters.text_tokenizer import Encoded

    if (text is None) == (ids is None):
        raise UserError("give exactly one of --text or --ids")
    graph, recipe = _graph_path(model)
    folder = graph.parent
    tok = _tokenizer(folder, allow_transformers=text is not None)
    if text is not None:
        if tok is None:
            raise UserError(f"{folder}: no tokenizer files to encode --text; use --ids")
        enc = tok.encode(text)
        if not any(enc.attention_mask):
            raise UserError("--text encodes to no tokens")
    else:
        parsed = parse_ids(ids or "")
        enc = Encoded(parsed, [1] * len(parsed), [0] * len(parsed))

    from exporters.ort_decoder import OrtDecoder
    from exporters.providers import choose_provider, open_session, really_used

    chosen = choose_provider(provider)
    try:
        session = open_session(graph, chosen)
    except Exception as exc:
        raise UserError(f"{graph}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") from None
    used, _ = really_used(session)
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    out_name = "logits" if "logits" in outputs else "last_hidden_state"
    if out_name not in outputs or not {"input_ids", "attention_mask"} <= set(names):
        raise UserError(f"{graph}: inputs {names} and outputs {outputs} are not an exported decoder or encoder")
    vocab = _vocab_size(session, folder, out_name)
    if vocab is not None:
        bad = [i for i in enc.ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"{'--ids' if ids is not None else '--text'}: token id {bad[0]} is outside the "
                            f"vocabulary (ids 0 to {vocab - 1})")
    input_ids = np.asarray([enc.ids], dtype=np.int64)
    mask = np.asarray([enc.attention_mask], dtype=np.int64)
    try:
        if out_name == "logits":
            decoder = OrtDecoder(session)
            out, _ = decoder.step(input_ids, mask, decoder.start(1))
        else:
            feed = {"input_ids": input_ids, "attention_mask": mask}
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.asarray([enc.type_ids], dtype=np.int64)
            (out,) = session.run([out_name], feed)
    except Exception as exc:
        raise UserError(f"{graph}: inference failed on {len(enc.ids)} tokens "
                        f"({str(exc).splitlines()[0][:160]})") from None
    out = out.astype(np.float64)
    real = mask[0].astype(bool)
    token_ids = [int(i) for i, m in zip(enc.ids, enc.attention_mask) if m]
    summary: dict[str, Any] = {"model": str(graph), "provider": used, "requested_provider": provider,
                               "input_ids": token_ids, "output": out_name, "task": recipe.get("task")}
    if tok is not None:  # each input token as text (--ids too, when the export carries a tokenizer)
        summary["input_tokens"] = [tok.decode([i]) for i in token_ids]
    if out_name == "logits":
        last = out[0, int(np.nonzero(real)[0][-1])]  # the last real token (a tokenizer may pad right)
        probs = np.exp(last - last.max())
        probs /= probs.sum()
        order = np.argsort(-last)[:top_k]
        summary["next_token"] = [
            {"id": int(i), "logit": float(last[i]), "prob": float(probs[i]),
             **({"token": tok.decode([int(i)])} if tok is not None else {})} for i in order]
    else:
        pooled = out[0][real].mean(axis=0)  # mean over real tokens only, as sentence-transformers pools
        summary["embedding"] = {"shape": [1, int(real.sum()), int(out.shape[-1])], "dim": int(pooled.shape[0]),
                                "mean_pooled_norm": float(np.linalg.norm(pooled)),
                                "first": [round(float(v), 6) for v in pooled[:4]]}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"provider  {used}")
    shown_input = " ".join(repr(t) for t in summary.get("input_tokens", []))
    click.echo(f"input     {len(token_ids)} tokens" + (f": {_clip(shown_input, 100)}" if shown_input else ""))
    if "next_token" in summary:
        for rank, cand in enumerate(summary["next_token"], 1):
            shown = f"  {cand['token']!r}" if "token" in cand else ""
            click.echo(f"{'next' if rank == 1 else '':<8}  {cand['id']:>6}  p={cand['prob']:.4f}  "
                       f"logit={cand['logit']:.4f}{shown}")
    else:
        e = summary["embedding"]
        click.echo(f"embedding dim {e['dim']}, mean-pooled norm {e['mean_pooled_norm']:.4f}, "
                   f"first {e['first']}")


def _clip(text: str, width: int) -> str:
    """`text` cut to `width` characters with an ellipsis (the JSON keeps every token)."""
    return text if len(text) <= width else text[: width - 3] + "..."
