"""Model cards (README.md) for what `adapters publish` uploads.

The metadata block is written by huggingface_hub's `ModelCardData` (the Hub's own
schema): `base_model` (the base's repo id, when known), `base_model_relation` (`adapter`
for a version's PEFT folder, `merge` for a merged artifact), `library_name` (`peft` for
adapters) and tags. The text says what the registry knows and the Hub does not: the base's
resolved commit and weight digests, the adapter spec, the lineage (parents, inputs and
weights of a merge) and the digest of every uploaded file, so a download can be checked
against the registry record.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

from registry.info import ArtifactInfo, VersionInfo


def load_renderer() -> None:
    """Import what the metadata block needs (huggingface_hub's `ModelCardData`, with yaml
    and filelock: ~50 ms here) ahead of the first card: a merge does it in a thread beside
    its work (`exporters.recipe.AdapterDigests`), so the card written after its last shard
    does not wait for it."""
    from huggingface_hub import ModelCardData  # noqa: F401


def _front_matter(**fields: Any) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(**{k: v for k, v in fields.items() if v not in (None, [], {})})
    return f"---\n{data.to_yaml()}\n---\n"


def _base_section(model: str | None, revision: str | None, files: dict[str, str] | None,
                  notes: list[str] = ()) -> list[str]:
    out = ["## Base model", ""]
    if not model:
        return [*out, "Not recorded when this adapter was pushed.", ""]
    out.append(f"- repo / name: `{model}`")
    out.append(f"- commit / revision: `{revision}`" if revision else "- commit / revision: not recorded")
    out += list(notes)
    if files:
        out += ["", "| file | sha256 |", "|---|---|"]
        out += [f"| `{f}` | `{d[7:] if d.startswith('sha256:') else d}` |" for f, d in sorted(files.items())]
    return [*out, ""]


def _hub_repo(model: str | None) -> str | None:
    """A base model name usable as the card's `base_model` (a Hub repo id), else None."""
    if not model:
        return None
    name = model[3:] if model.startswith("hf:") else model
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) and not name.startswith((".", "/")) else None


def version_card(info: VersionInfo, lineage: dict[str, Any]) -> str:
    """The card of a version's PEFT folder (`base_model_relation: adapter`)."""
    spec = info.spec or {}
    base = _hub_repo(info.base_model)
    head = _front_matter(base_model=base, base_model_relation="adapter" if base else None,
                         library_name="peft", tags=["peft", info.kind, "adapter-registry"])
    lines = [f"# {info.ref}", "", info.message or f"A {info.kind} adapter published from an adapter registry.", "",
             f"- version digest: `{info.digest}`", f"- author: {info.author}",
             f"- created: {info.created.isoformat()}", ""]
    lines += _base_section(info.base_model, info.base_revision, info.base_files)
    lines += ["## Adapter", "", "```json", json.dumps(spec, indent=2, sort_keys=True), "```", ""]
    if info.meta:
        lines += ["## Metadata", ""] + [f"- {k}: {v}" for k, v in sorted(info.meta.items())] + [""]
    lines += ["## Lineage", ""]
    for e in lineage.get("edges", []):
        w = f" (weight {e['weight']:g})" if e.get("weight") is not None else ""
        lines.append(f"- {e['kind']}: `{e['from']}` -> `{e['to']}`{w}")
    lines += ["", "## Files", "", "| file | sha256 | bytes |", "|---|---|---|"]
    lines += [f"| `{f['path']}` | `{f['digest'][7:]}` | {f['size']} |" for f in info.files or []]
    return head + "\n" + "\n".join(lines) + "\n"


def artifact_card(art: ArtifactInfo, inputs: dict[str, VersionInfo]) -> str:
    """The card `publish` uploads for a merged artifact (`base_model_relation: merge`): the
    output's own card (`merge_card`) plus what the store recorded (digest, author, time)."""
    record = [f"- artifact digest: `{art.digest}`", f"- author: {art.author}",
              f"- created: {art.created.isoformat()}"]
    files = {f: d for f, d in art.files.items() if f != CARD_NAME}  # the card itself is this text
    return merge_card(f"{art.ref} ({art.kind})", art.kind, art.recipe, art.report, files,
                      {r: _version_facts(v) for r, v in inputs.items()}, record)


def _version_facts(v: VersionInfo) -> dict[str, Any]:
    return {"kind": v.kind, "digest": v.digest, "base_model": v.base_model, "base_revision": v.base_revision,
            "spec": v.spec or {}}


CARD_NAME = "README.md"


def merge_card(title: str, kind: str, recipe: dict[str, Any], report: dict[str, Any] | None,
               files: dict[str, str], inputs: dict[str, dict[str, Any]] | None = None,
               record: list[str] | None = None) -> str:
    """The one model card of a merged model (README.md with YAML front matter).

    Written into every merge output by `exporters.card` and uploaded by `publish`
    (`artifact_card`, which adds the store's record). `recipe` is an artifact recipe
    (`exporters.recipe.build_recipe`: base identity and file digests, adapters with
    weights and digests, dtype, accumulation, `merge` figures); `report` the ONNX
    validation report (None for safetensors); `files` {path: digest} of the output's
    other files; `inputs` {ref: {kind, digest, base_model, base_revision, spec}} of the
    registry versions merged. Front matter: `base_model` (a Hub repo id when one is
    known: the Hub base, else the base config's `_name_or_path`, else the versions'
    common `base_model`), `base_model_relation: merge`, tags.
    """
    inputs = inputs or {}
    base = recipe.get("base") or {}
    hub = base.get("hub") or {}
    versions_base = {v.get("base_model") for v in inputs.values()} - {None}
    # a config's `_name_or_path` is often the base's own base (all-MiniLM-L6-v2 says
    # nreimers/MiniLM-L6-H384-uncased): shown, never claimed as `base_model`
    model = hub.get("repo") or (versions_base.pop() if len(versions_base) == 1 else None)
    revision = hub.get("commit")
    repo = _hub_repo(model)
    head = _front_matter(base_model=repo, base_model_relation="merge" if repo else None,
                         tags=["adapter-registry", "merge", kind])
    lines = [f"# {title}", "",
             "Base weights with adapters folded in: `W' = W + sum_i w_i * dW_i`, accumulated in "
             f"{recipe.get('accumulate', 'float32')}, stored as {recipe.get('dtype')}.", ""]
    if record:
        lines += [*record, ""]
    notes = [f"- the base config's `_name_or_path`: `{base['name_or_path']}`"] if base.get("name_or_path") else []
    # local paths are named, never spelled out: a card is published, and the same inputs in
    # another place give the same card
    local = f"local folder {PurePath(base['path']).name}" if base.get("path") else None
    lines += _base_section(model or local, revision, base.get("files"), notes)
    lines += ["## Merged adapters (lineage)", "", "| adapter | weight | kind | digest | base |", "|---|---|---|---|---|"]
    for a in recipe.get("adapters", []):
        v = inputs.get(a.get("ref")) or {}
        digest = v.get("digest") or a.get("folder_digest") or ""
        where = (f"`{a.get('ref')}`" if a.get("from") == "registry"
                 else f"folder `{PurePath(str(a.get('ref'))).name}`")
        vbase = (v.get("base_model") or "") + ("@" + v["base_revision"] if v.get("base_revision") else "")
        lines.append(f"| {where} | {a.get('weight'):g} | {a.get('kind', '')} | `{digest}` | {vbase} |")
    lines += ["", "Digests: a registry version's digest, or the sha256 of a folder's adapter weights.", ""]
    if inputs:
        lines += ["## Adapter specs", ""]
        for ref, v in inputs.items():
            lines += [f"`{ref}`:", "", "```json", json.dumps(v.get("spec") or {}, indent=2, sort_keys=True), "```", ""]
    lines += _merge_section(recipe.get("merge"))
    lines += _validation_section(report)
    if files:
        lines += ["## Files", "", "| file | sha256 |", "|---|---|"]
        lines += [f"| `{f}` | `{d[7:] if d.startswith('sha256:') else d}` |" for f, d in sorted(files.items())]
    return head + "\n" + "\n".join(lines) + "\n"


def _merge_section(merge: dict[str, Any] | None) -> list[str]:
    """What the merge changed (safetensors outputs): tensors changed, max |dW|, dtype used."""
    if not merge:
        return []
    out = ["## Merge", ""]
    if "tensors_changed" in merge:
        out.append(f"- tensors changed: {merge['tensors_changed']} of {merge.get('tensors_total')}")
    if merge.get("max_abs_delta") is not None:
        out.append(f"- max |dW| applied: {merge['max_abs_delta']:.6g}"
                   + (f" (in `{merge['max_abs_delta_tensor']}`)" if merge.get("max_abs_delta_tensor") else ""))
    if merge.get("dtype"):
        out.append(f"- output dtype: {merge['dtype']}" + (" (kept from the base)" if merge.get("dtype_requested") == "auto"
                                                           else ""))
    if merge.get("untied"):
        out.append("- untied: " + ", ".join(f"`{k}` (from `{v}`)" for k, v in merge["untied"].items()))
    return [*out, ""]


def _validation_section(report: dict[str, Any] | None) -> list[str]:
    """The ONNX validation summary: each comparison named, with its max abs diff and the
    worst ratio to the tolerance (<= 1 passes), on which provider."""
    if not report:
        return []
    out = ["## Validation", ""]
    crit = report.get("criterion") or "|onnx - ref| <= atol + rtol*|ref|"
    out.append(f"{'Passed' if report.get('passed') else 'FAILED'} on {report.get('provider')} "
               f"(graph {report.get('graph_dtype')}, reference {report.get('reference_dtype')}): `{crit}`, "
               f"atol {report.get('atol')}, rtol {report.get('rtol')}.")
    comparisons = report.get("comparisons") or {}
    if comparisons:
        out += ["", "| compared with | cases | max abs diff | worst ratio to the tolerance | passed |", "|---|---|---|---|---|"]
        for c in comparisons.values():
            if not isinstance(c, dict) or "max_abs_diff" not in c:
                continue
            ratio = c.get("worst_ratio")
            out.append(f"| {c.get('name')} | {len(c.get('cases') or [])} | {c['max_abs_diff']:.3g} | "
                       f"{ratio:.3g} | {'yes' if c.get('passed') else 'no'} |" if ratio is not None else
                       f"| {c.get('name')} | {len(c.get('cases') or [])} | {c['max_abs_diff']:.3g} | | "
                       f"{'yes' if c.get('passed') else 'no'} |")
    return [*out, ""]
