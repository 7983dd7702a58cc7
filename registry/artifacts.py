"""Artifacts: outputs built from versions (merged safetensors folders, ONNX graphs), recorded
where they were written (they can be many GB; they are not copied into the store), with
their files' digests, recipe, validation report and lineage edges from their inputs.

A caller that hashed the files while writing them passes `files` and nothing is read
again here; without it, each file is hashed once.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import audit, outputs, records, refs
from registry.config import actor
from registry.copying import hash_file
from registry.db import Database
from registry.digests import artifact_digest, canonical, is_digest
from registry.errors import IntegrityError, RegistryError
from registry.info import ArtifactInfo, utc
from registry.models import Artifact, ArtifactInput, Name, Version
from registry.names import artifact_ref, parse_ref, version_ref
from registry.paths import check_relative_path, join_inside

KINDS = ("safetensors", "onnx", "onnx_slots", "onnx_adapter")


def register(db: Database, *, kind: str, path: str | Path, files: dict[str, str] | None,
             recipe: dict, inputs: list[tuple[str, float]], report: dict | None,
             output: int | None = None) -> ArtifactInfo:
    """Record an output in place, with edges from each input version (weights of a repeated
    input add up) and an audit event. `files`: {path relative to `path`: `sha256:` digest}."""
    if kind not in KINDS:
        raise RegistryError(f"artifact kind {kind!r}: expected one of {', '.join(KINDS)}")
    path = Path(path).resolve()
    files = hash_files(path) if files is None else check_files(path, files)
    digest = artifact_digest(kind, files)
    recipe_text = canonical(recipe)
    report_text = canonical(report) if report is not None else None
    with db.writing() as s:
        weights: dict[int, float] = {}
        labels: dict[int, str] = {}
        for ref, w in inputs:
            v = refs.version_row(s, ref)
            weights[v.id] = weights.get(v.id, 0.0) + float(w)
            labels[v.id] = refs.label(v)
        a = Artifact(digest=digest, kind=kind, path=str(path), files=canonical(files),
                     recipe=recipe_text, report=report_text, author=actor(), created=datetime.now(timezone.utc))
        s.add(a)
        s.flush()
        for vid, w in weights.items():
            s.add(ArtifactInput(artifact_id=a.id, version_id=vid, weight=w))
        if output is not None:
            outputs.complete(s, output)  # no longer pending: registered in the same transaction
        s.flush()
        audit.append(s, "register", artifact_ref(a.id),
                     {"kind": kind, "path": str(path), "digest": digest,
                      "inputs": [[labels[v], w] for v, w in weights.items()],
                      "row": records.content_digest(records.artifact_content(s, a, labels))})
        s.flush()
        return describe(s, a)


def hash_files(path: Path) -> dict[str, str]:
    """{relative posix path: digest} of a folder's files (or of one file), sorted."""
    if path.is_dir():
        files = {check_relative_path(p.relative_to(path).as_posix(), f"{path}: file"): p
                 for p in path.rglob("*") if p.is_file()}
        return {rel: hash_file(files[rel])[0] for rel in sorted(files)}
    if path.is_file():
        return {path.name: hash_file(path)[0]}
    raise RegistryError(f"{path}: artifact not found")


def check_files(path: Path, files: dict[str, str]) -> dict[str, str]:
    """Validate caller-computed digests without reading the files: well-formed digests,
    relative paths inside the artifact, each naming an existing file. Returns them sorted."""
    if not path.exists():
        raise RegistryError(f"{path}: artifact not found")
    if not files:
        raise RegistryError(f"{path}: an artifact needs at least one file")
    for rel, digest in files.items():
        try:
            check_relative_path(rel, "artifact file")
        except RegistryError as exc:
            raise RegistryError(f"{exc}: expected a path relative to {path}") from None
        if not is_digest(digest):
            raise RegistryError(f"artifact file {rel}: malformed digest {digest!r}")
        if not file_of(path, rel).is_file():
            raise RegistryError(f"{file_of(path, rel)}: artifact file not found")
    return dict(sorted(files.items()))


def damage(ref: str, root: Path, files: dict[str, str]) -> list[tuple[bool, str]]:
    """(altered?, one line) for each recorded file that is missing or whose bytes differ (re-hashed)."""
    out = []
    for rel, digest in files.items():
        try:  # the stored name is data (the row may be forged): a plain relative path, no symlink
            p = root if root.is_file() else join_inside(root, rel, f"{ref}: stored file", IntegrityError, nested=True)
        except IntegrityError as exc:
            out.append((True, str(exc)))
            continue
        if p.is_symlink():
            out.append((True, f"{ref}: {p} is a symbolic link (replaced after it was written)"))
        elif not p.is_file():
            out.append((False, f"{ref}: {p} is missing"))
        elif hash_file(p)[0] != digest:
            out.append((True, f"{ref}: {p} is altered (digest differs from the record)"))
    return out


def check(db: Database, ref: str) -> list[str]:
    """Problems of one artifact's files (missing, altered); [] when every file matches its record."""
    info = artifact(db, ref)
    return [line for _, line in damage(info.ref, Path(info.path), info.files)]


def file_of(root: Path, rel: str) -> Path:
    """Where an artifact's file `rel` lives (the artifact may be a single file)."""
    return root if root.is_file() else root / rel


def describe(s: Session, a: Artifact) -> ArtifactInfo:
    """The one place an artifact row becomes an ArtifactInfo (inputs as `name:N`, sorted)."""
    inputs = [(version_ref(n, num), w) for n, num, w in s.execute(
        select(Name.name, Version.number, ArtifactInput.weight)
        .join(Version, Version.id == ArtifactInput.version_id).join(Name, Name.id == Version.name_id)
        .where(ArtifactInput.artifact_id == a.id).order_by(Name.name, Version.number))]
    return ArtifactInfo(id=a.id, digest=a.digest, kind=a.kind, path=a.path, files=json.loads(a.files),
                        recipe=json.loads(a.recipe), report=json.loads(a.report) if a.report else None,
                        inputs=inputs, author=a.author, created=utc(a.created))


def artifact_row(s: Session, ref: str) -> Artifact:
    """The artifact row of `artifact:ID` or `artifact@sha256:PREFIX`."""
    r = parse_ref(ref)
    if not r.is_artifact:
        raise RegistryError(f"reference {ref!r} is not an artifact reference")
    if r.artifact_id is not None:
        a = s.get(Artifact, r.artifact_id)
        if a is None:
            raise RegistryError(f"unknown artifact {ref!r}")
        return a
    return refs.one_by_digest(
        s, select(Artifact), Artifact.digest, r.digest_prefix, missing=f"unknown artifact {ref!r}",
        ambiguous=lambda a, b: f"reference {ref!r} is ambiguous ({artifact_ref(a.id)}, {artifact_ref(b.id)}): "
                               "give more digits")


def artifact(db: Database, ref: str) -> ArtifactInfo:
    """Everything recorded about an artifact."""
    with db.read() as s:
        return describe(s, artifact_row(s, ref))


def forget(db: Database, ref: str, delete_files: bool = False) -> dict[str, Any]:
    """Forget an artifact (audited): its record, its lineage edges, batch results pointing at it.

    With `delete_files`, the files its record lists are removed afterwards (only those, each a
    plain relative path inside the recorded folder; folders left empty go too). The versions it
    was built from can then be deleted. Returns {"forgotten": ref, "path", "files_deleted"}.
    """
    from sqlalchemy import delete as sql_delete

    from registry.models import BatchJob

    with db.writing() as s:
        a = artifact_row(s, ref)
        label, root, files = artifact_ref(a.id), Path(a.path), json.loads(a.files)
        s.execute(sql_delete(ArtifactInput).where(ArtifactInput.artifact_id == a.id))
        s.execute(sql_delete(BatchJob).where(BatchJob.artifact_id == a.id))
        audit.append(s, "forget", label, {"digest": a.digest, "path": a.path, "delete_files": delete_files})
        s.delete(a)
    deleted = _delete_recorded(root, files) if delete_files else 0
    return {"forgotten": label, "path": str(root), "files_deleted": deleted}


def _delete_recorded(root: Path, files: dict[str, str]) -> int:
    """Remove the recorded files under `root` (never anything else); then the folders left empty."""
    if root.is_file():
        root.unlink()
        return 1
    n = 0
    for rel in files:
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            continue  # a record that does not name a plain relative file is not followed
        p = root.joinpath(*parts)
        if p.is_symlink() or p.is_file():
            p.unlink()
            n += 1
    for d in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
    return n
