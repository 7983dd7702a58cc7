"""Rows covered by the audit chain: what a push, a tag or a register wrote, proven later by `verify`.

The audit chain proves that no event was rewritten, but `verify` used to trust the rows
themselves. Now every event that creates or moves something records a digest of what it
wrote, and `check_rows` recomputes the rows against the events:

- a version (`push` event, `row`): name, number, content digest, spec, base model/revision/
  files, parent, metadata, author, message, creation time, size and every file (path, blob,
  size); the files' permission bits are in the event too (`modes`, compared where recorded:
  a schema downgrade drops them). `check_rows` also recomputes the content digest from the file list (a file row
  re-pointed at another blob) and compares the `--where` index rows with the metadata;
- an alias: replaying `tag`/`untag` events (and `delete`, which drops a version's aliases)
  gives the alias table the events describe; any difference is damage;
- an artifact (`register` event, `row`): kind, path, digest, files, recipe, report, inputs
  with their weights, author, creation time; its digest is recomputed from its files.

A version or artifact without the event that created it, or an event whose row is gone
without a `delete` event, is damage too. Rows written before this scheme (events without
`row`) are reported once as a warning and checked for what can be recomputed.

What stays undetectable without a key: someone who can write the database can rewrite rows
and recompute the whole chain after them (sha256 needs no secret). `registry.signing` adds
an HMAC of the chain head with a key the writer holds (`ADAPTERS_AUDIT_KEY`).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.digests import artifact_digest, canonical, manifest_digest, sha256_text
from registry.info import utc
from registry.models import (
    Alias,
    Artifact,
    ArtifactInput,
    AuditEvent,
    Name,
    Version,
    VersionFile,
    VersionMeta,
)


def content_digest(content: dict[str, Any]) -> str:
    """`sha256:<hex>` of a row's canonical content (what an event records as `row`)."""
    return sha256_text(canonical(content))


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"unparsable": text}


def version_content(s: Session, v: Version, names: dict[int, str] | None = None) -> dict[str, Any]:
    """Everything a push records about a version, read back from its rows."""
    names = names if names is not None else {}

    def name_of(name_id: int) -> str:
        if name_id not in names:
            names[name_id] = s.scalar(select(Name.name).where(Name.id == name_id))
        return names[name_id]

    parent = None
    if v.parent_id is not None:
        p = s.execute(select(Version.name_id, Version.number).where(Version.id == v.parent_id)).first()
        parent = f"{name_of(p.name_id)}:{p.number}" if p is not None else f"missing version id {v.parent_id}"
    files = {f.path: [f.blob, f.size] for f in s.scalars(select(VersionFile).where(VersionFile.version_id == v.id))}
    return {"name": name_of(v.name_id), "number": v.number, "digest": v.digest, "kind": v.kind, "r": v.r,
            "mora_type": v.mora_type, "spec": _json(v.spec), "base_model": v.base_model,
            "base_revision": v.base_revision, "base_files": _json(v.base_files), "parent": parent,
            "meta": _json(v.meta), "author": v.author, "message": v.message,
            "created": utc(v.created).isoformat(), "size": v.size, "files": dict(sorted(files.items()))}


def artifact_content(s: Session, a: Artifact, labels: dict[int, str] | None = None) -> dict[str, Any]:
    """Everything a register records about an artifact, read back from its rows."""
    inputs = []
    for vid, w in s.execute(select(ArtifactInput.version_id, ArtifactInput.weight)
                            .where(ArtifactInput.artifact_id == a.id)):
        label = (labels or {}).get(vid)
        if label is None:
            row = s.execute(select(Name.name, Version.number).join(Name, Name.id == Version.name_id)
                            .where(Version.id == vid)).first()
            label = f"{row.name}:{row.number}" if row is not None else f"missing version id {vid}"
        inputs.append([label, float(w)])
    return {"kind": a.kind, "path": a.path, "digest": a.digest, "files": _json(a.files),
            "recipe": _json(a.recipe), "report": _json(a.report), "inputs": sorted(inputs),
            "author": a.author, "created": utc(a.created).isoformat()}


def check_rows(s: Session) -> tuple[list[str], list[str]]:
    """(problems, warnings) from recomputing versions, aliases and artifacts against the events."""
    problems: list[str] = []
    warnings: list[str] = []
    pushed: dict[str, str | None] = {}  # name:N -> row digest recorded at push (None: legacy event)
    deleted: set[str] = set()
    registered: dict[str, str | None] = {}
    modes: dict[str, dict] = {}  # name:N -> {path: permission bits} recorded at push
    aliases: dict[tuple[str, str], str] = {}
    for ev in s.scalars(select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=2000)):
        d = _json(ev.details)
        if not isinstance(d, dict):
            continue
        if ev.action == "push" and not d.get("unchanged"):
            pushed[ev.subject] = d.get("row")
            modes[ev.subject] = d.get("modes") if isinstance(d.get("modes"), dict) else {}
            deleted.discard(ev.subject)
        elif ev.action == "delete":
            deleted.add(ev.subject)
            aliases = {k: v for k, v in aliases.items() if v != ev.subject}
        elif ev.action == "tag" and ev.name and isinstance(d.get("alias"), str):
            aliases[(ev.name, d["alias"])] = d.get("to")
        elif ev.action == "untag" and ev.name and isinstance(d.get("alias"), str):
            aliases.pop((ev.name, d["alias"]), None)
        elif ev.action == "register":
            registered[ev.subject] = d.get("row")
        elif ev.action == "forget":  # `adapters rm artifact:N`
            registered.pop(ev.subject, None)
    names = dict(s.execute(select(Name.id, Name.name)).all())
    labels: dict[int, str] = {}
    legacy = 0
    for v in s.scalars(select(Version).order_by(Version.id)):
        label = f"{names.get(v.name_id, f'name id {v.name_id}')}:{v.number}"
        labels[v.id] = label
        content = version_content(s, v, names)
        files = {p: f[0] for p, f in content["files"].items()}
        if manifest_digest(files) != v.digest:
            problems.append(f"version {label}: its files do not add up to its digest {v.digest[:19]}... "
                            "(a file row was re-pointed or the digest rewritten)")
        meta_rows = {k: val for k, val in s.execute(select(VersionMeta.key, VersionMeta.value)
                                                     .where(VersionMeta.version_id == v.id))}
        if meta_rows != content["meta"]:
            problems.append(f"version {label}: its --where index rows differ from its metadata")
        if label not in pushed:
            problems.append(f"version {label} has no push event (the row was added behind the registry's back)")
        elif label in deleted:
            problems.append(f"version {label} exists although an audit event deleted it")
        elif pushed[label] is None:
            legacy += 1
        elif pushed[label] != content_digest(content):
            problems.append(f"version {label}: its row differs from what its push recorded "
                            "(spec, base, metadata, parent, files or digest rewritten)")
        for path, mode in s.execute(select(VersionFile.path, VersionFile.mode).where(VersionFile.version_id == v.id)):
            if mode is not None and path in modes.get(label, {}) and modes[label][path] != mode:
                problems.append(f"version {label}: {path} mode {mode:o} differs from {modes[label][path]:o} "
                                "recorded at push")
    for label in sorted(set(pushed) - set(labels.values()) - deleted):
        problems.append(f"version {label} was deleted without an audit event")
    table = {(names.get(a.name_id, f"name id {a.name_id}"), a.alias): labels.get(a.version_id, "?")
             for a in s.scalars(select(Alias))}
    for key in sorted(set(table) | set(aliases), key=str):
        want, got = aliases.get(key), table.get(key)
        if want != got:
            where = f"{key[0]}@{key[1]}"
            problems.append(f"alias {where} points at {got or 'nothing'} but the audit log says "
                            f"{want or 'it does not exist'} (moved without an audit event)")
    for a in s.scalars(select(Artifact).order_by(Artifact.id)):
        label = f"artifact:{a.id}"
        content = artifact_content(s, a, labels)
        if isinstance(content["files"], dict) and artifact_digest(a.kind, content["files"]) != a.digest:
            problems.append(f"{label}: its file list does not add up to its digest (rewritten)")
        if label not in registered:
            problems.append(f"{label} has no register event (the row was added behind the registry's back)")
        elif registered[label] is None:
            legacy += 1
        elif registered[label] != content_digest(content):
            problems.append(f"{label}: its row differs from what its register event recorded "
                            "(path, files, recipe, report or inputs rewritten)")
    for label in sorted(set(registered) - {f"artifact:{i}" for i in s.scalars(select(Artifact.id))}):
        problems.append(f"{label} was deleted without an audit event")
    if legacy:
        warnings.append(f"{legacy} versions/artifacts were recorded before row digests: their metadata is "
                        "only checked against their content digest")
    return problems, warnings
