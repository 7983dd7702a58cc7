"""`adapters run OUT --ids 1,2,3 | --text "..."`: proof that an exported graph serves.

Loads `OUT/model.onnx` in ONNX Runtime (no torch), feeds one sequence and prints the
next-token prediction (causal LMs) or a summary of the mean-pooled embedding (encoders),
with the provider that really ran. `--text` needs the tokenizer files that the export
copied from the base folder; `--ids` needs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapters_cli.common import UserError, emit_json, run_guarded, store_options


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
    """The graph to load and the export's recipe, read under the folder rule.

    `model` is an export folder (or a `.onnx` file in one). The graph, its external data
    and `export.json` are read only if they are regular files inside that folder (no
    symbolic link leaving it, no FIFO); the recipe goes through the strict JSON reader.
    """
    from exporters.onnx_layout import DATA_NAME, GRAPH_NAME, RECIPE_NAME
    from mora_core.checkpoint import member
    from mora_core.safe_io import read_json

    if model.suffix == ".onnx" and not model.is_dir():
        folder, name = model.parent, model.name
    elif model.is_dir():
        folder, name = model, GRAPH_NAME
        if not (folder / name).exists() and not (folder / name).is_symlink():
            raise UserError(f"{model}: no {GRAPH_NAME} here (give an `adapters merge --to onnx` output folder)")
    else:
        raise UserError(f"{model}: no such folder (give an `adapters merge --to onnx` output folder)")
    graph = member(folder, name)
    if (folder / DATA_NAME).exists() or (folder / DATA_NAME).is_symlink():
        member(folder, DATA_NAME)
    recipe: dict[str, Any] = {}
    if (folder / RECIPE_NAME).exists() or (folder / RECIPE_NAME).is_symlink():
        member(folder, RECIPE_NAME)
        loaded = read_json(folder / RECIPE_NAME, what="export recipe")
        if not isinstance(loaded, dict):
            raise UserError(f"{folder / RECIPE_NAME}: not a JSON object")
        recipe = loaded
    return graph, recipe


def _parse_ids(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UserError(f"--ids {text!r}: expected comma-separated integers like 1,2,3") from None
    if not out or any(not 0 <= i < 2**63 for i in out):
        raise UserError(f"--ids {text[:80]!r}: give at least one token id, each from 0 to 2**63-1")
    return out


class _Tokenizer:
    """encode/decode over `tokenizers` (tokenizer.json, no torch) or, failing that, transformers."""

    def __init__(self, encode, decode):
        self.encode, self.decode = encode, decode


def _tokenizer(folder: Path, allow_transformers: bool) -> _Tokenizer | None:
    path = folder / "tokenizer.json"
    if path.exists() or path.is_symlink():
        from mora_core.checkpoint import member

        path = member(folder, "tokenizer.json")  # the folder rule: no link out, no FIFO
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            return _Tokenizer(lambda text: tok.encode(text).ids, lambda ids: tok.decode(ids))
        except Exception:
            pass
    if not allow_transformers:  # transformers imports torch: only when --text needs it
        return None
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return _Tokenizer(lambda text: list(hf(text)["input_ids"]), lambda ids: hf.decode(ids))
    except Exception:
        return None


def _run(model: Path, text: str | None, ids: str | None, provider: str, top_k: int, as_json: bool) -> None:
    import numpy as np

    if (text is None) == (ids is None):
        raise UserError("give exactly one of --text or --ids")
    graph, recipe = _graph_path(model)
    folder = graph.parent
    tok = _tokenizer(folder, allow_transformers=text is not None)
    if text is not None:
        if tok is None:
            raise UserError(f"{folder}: no tokenizer files to encode --text; use --ids")
        token_ids = list(tok.encode(text))
        if not token_ids:
            raise UserError("--text encodes to no tokens")
    else:
        token_ids = _parse_ids(ids or "")

    from exporters.providers import choose_provider, open_session, really_used

    chosen = choose_provider(provider)
    try:
        session = open_session(graph, chosen)
    except Exception as exc:
        raise UserError(f"{graph}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") from None
    used, _ = really_used(session)
    names = [i.name for i in session.get_inputs()]
    if set(names) != {"input_ids", "attention_mask"}:
        raise UserError(f"{graph}: inputs are {names}, expected input_ids and attention_mask")
    out_meta = session.get_outputs()[0]
    vocab = out_meta.shape[-1] if out_meta.name == "logits" and isinstance(out_meta.shape[-1], int) else None
    if vocab is not None and max(token_ids) >= vocab:
        raise UserError(f"--ids: token id {max(token_ids)} is outside the vocabulary (size {vocab})")
    feed = {"input_ids": np.asarray([token_ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(token_ids)), dtype=np.int64)}
    try:
        (out,) = session.run([out_meta.name], feed)
    except Exception as exc:
        raise UserError(f"{graph}: inference failed on {len(token_ids)} tokens "
                        f"({str(exc).splitlines()[0][:160]})") from None
    out = out.astype(np.float64)
    summary: dict[str, Any] = {"model": str(graph), "provider": used, "requested_provider": provider,
                               "input_ids": token_ids, "output": out_meta.name, "task": recipe.get("task")}
    if out_meta.name == "logits":
        last = out[0, -1]
        probs = np.exp(last - last.max())
        probs /= probs.sum()
        order = np.argsort(-last)[:top_k]
        summary["next_token"] = [
            {"id": int(i), "logit": float(last[i]), "prob": float(probs[i]),
             **({"token": tok.decode([int(i)])} if tok is not None else {})} for i in order]
    else:
        pooled = out[0].mean(axis=0)
        summary["embedding"] = {"shape": list(out.shape), "dim": int(pooled.shape[0]),
                                "mean_pooled_norm": float(np.linalg.norm(pooled)),
                                "first": [round(float(v), 6) for v in pooled[:4]]}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"provider  {used}")
    click.echo(f"input     {len(token_ids)} tokens")
    if "next_token" in summary:
        for rank, cand in enumerate(summary["next_token"], 1):
            shown = f"  {cand['token']!r}" if "token" in cand else ""
            click.echo(f"{'next' if rank == 1 else '':<8}  {cand['id']:>6}  p={cand['prob']:.4f}  "
                       f"logit={cand['logit']:.4f}{shown}")
    else:
        e = summary["embedding"]
        click.echo(f"embedding dim {e['dim']}, mean-pooled norm {e['mean_pooled_norm']:.4f}, "
                   f"first {e['first']}")
