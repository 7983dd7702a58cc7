"""The model card of a merge output: `README.md`, written into the output before it appears.

A merged folder is a complete model of the base's kind, and the base's own card describes
the base, not the merge (`exporters.outputs` never copies it). `OutputCard` is the hook
both writers call inside their staged folder, once every other file is written: it
renders `registry.model_card.merge_card` (the one card writer; `publish` uses it too,
adding the store's record) from the recipe the artifact is registered with
(`exporters.recipe.build_recipe`), so the card says `base_model`,
`base_model_relation: merge`, each adapter with its weight and digest, and the merge
figures (safetensors) or the validation summary (ONNX).

The card is a function of the inputs and the result only: the same with or without
`--no-register` (a batch job and a single merge write the same bytes). So it leaves out
what only a registering run knows: the base's file digests and the output's own file
digests (the registry record and `publish`'s card have them). Its digest is taken as it
is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from exporters.outputs import write_file
from mora_core.checkpoint import Checkpoint
from registry.model_card import CARD_NAME


class OutputCard:
    """`card(folder, summary) -> {README.md: digest}`: writes the card into `folder`.

    Args:
        kind: "safetensors" or "onnx".
        checkpoint: the base, opened once for the run.
        resolved: the `exporters.inputs.ResolvedAdapter`s, in order; `weights` theirs.
        dtype, accumulate: what was asked (the summary's figures say what was used).
        hub: {"repo", "commit"} when the base came from the Hugging Face Hub.
        name: the output's name, the card's title (the folder written may be a temporary one).
        digests: gives the adapters' weights digests, found once for the whole job
            (`exporters.recipe.AdapterDigests.result`: the record names the same ones).
    """

    def __init__(self, kind: str, checkpoint: Checkpoint, resolved: Sequence[Any], weights: Sequence[float],
                 dtype: str, accumulate: str, hub: dict[str, str] | None = None, name: str | None = None, *,
                 digests: Callable[[], Sequence[str | None]]):
        self.kind, self.checkpoint, self.resolved, self.weights = kind, checkpoint, list(resolved), list(weights)
        self.dtype, self.accumulate, self.hub, self.name = dtype, accumulate, hub, name
        self._digests = digests

    def __call__(self, folder: Path, summary: dict[str, Any]) -> dict[str, str]:
        from exporters.recipe import build_recipe
        from registry.model_card import merge_card

        summary = {**summary, **({"merge": merge_figures(summary)} if self.kind == "safetensors" else {})}
        recipe = build_recipe(self.kind, self.checkpoint, {p.name: "" for p in self.checkpoint.paths},
                              self.resolved, self.weights, summary.get("dtype", self.dtype), self.accumulate,
                              summary, self._digests(), hub=self.hub)
        recipe["base"]["files"] = {}  # known only to a registering run: in the record, not here
        inputs = {r.ref: {"kind": r.version.kind, "digest": r.version.digest, "base_model": r.version.base_model,
                          "base_revision": r.version.base_revision, "spec": r.version.spec or {}}
                  for r in self.resolved if r.version is not None}
        title = f"{self.name or Path(summary.get('output') or folder).name} (merged, {self.kind})"
        text = merge_card(title, self.kind, recipe, summary.get("validation"), {}, inputs)
        return {CARD_NAME: write_file(Path(folder) / CARD_NAME, text.encode())}


def merge_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of a safetensors merge a card and a recipe keep (what changed, by how much)."""
    keys = ("tensors_total", "tensors_merged", "tensors_changed", "max_abs_delta", "max_abs_delta_tensor",
            "dtype", "dtype_requested", "untied")
    return {k: summary[k] for k in keys if k in summary}
