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
from typing import Any

from registry.info import ArtifactInfo, VersionInfo


def _front_matter(**fields: Any) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(**{k: v for k, v in fields.items() if v not in (None, [], {})})
    return f"---\n{data.to_yaml()}\n---\n"


def _base_section(model: str | None, revision: str | None, files: dict[str, str] | None) -> list[str]:
    out = ["## Base model", ""]
    if not model:
        return [*out, "Not recorded when this adapter was pushed.", ""]
    out.append(f"- repo / name: `{model}`")
    out.append(f"- commit / revision: `{revision}`" if revision else "- commit / revision: not recorded")
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
    """The card of a merged artifact (`base_model_relation: merge`)."""
    base = art.recipe.get("base") or {}
    hub = base.get("hub") or {}
    model = hub.get("repo") or base.get("name_or_path")
    revision = hub.get("commit")
    repo = _hub_repo(model)
    head = _front_matter(base_model=repo, base_model_relation="merge" if repo else None,
                         tags=["adapter-registry", "merge", art.kind])
    lines = [f"# {art.ref} ({art.kind})", "",
             "Base weights with adapters folded in: `W' = W + sum_i w_i * dW_i`, accumulated in "
             f"{art.recipe.get('accumulate', 'float32')}, stored as {art.recipe.get('dtype')}.", "",
             f"- artifact digest: `{art.digest}`", f"- author: {art.author}",
             f"- created: {art.created.isoformat()}", ""]
    lines += _base_section(model, revision, base.get("files"))
    lines += ["## Merged adapters (lineage)", "", "| version | weight | kind | digest | base |", "|---|---|---|---|---|"]
    for ref, weight in art.inputs:
        v = inputs.get(ref)
        lines.append(f"| `{ref}` | {weight:g} | {v.kind if v else ''} | `{v.digest if v else ''}` | "
                     f"{(v.base_model or '') if v else ''}{'@' + v.base_revision if v and v.base_revision else ''} |")
    for a in art.recipe.get("adapters", []):
        if a.get("from") == "folder":
            lines.append(f"| folder `{a.get('ref')}` | {a.get('weight')} | {a.get('kind')} | "
                         f"`{a.get('folder_digest')}` | |")
    lines += ["", "## Adapter specs", ""]
    for ref, v in inputs.items():
        lines += [f"`{ref}`:", "", "```json", json.dumps(v.spec or {}, indent=2, sort_keys=True), "```", ""]
    if art.report:
        lines += ["## Validation", "", "```json", json.dumps(art.report, indent=2, sort_keys=True)[:4000], "```", ""]
    lines += ["## Files", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{f}` | `{d[7:]}` |" for f, d in sorted(art.files.items())]
    return head + "\n" + "\n".join(lines) + "\n"
