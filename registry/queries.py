"""Read-only questions: list versions (filtered, paginated), show one, read audit events.

`list_versions` is the hot path of `adapters list` (10k versions must cost little more than
importing SQLAlchemy): one indexed query for the page, one for its aliases, one for its
parents' labels; no ORM objects are built.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import or_, select

from registry import artifacts, refs
from registry.audit import event_dict
from registry.db import Database
from registry.info import ArtifactInfo, VersionInfo
from registry.models import Alias, AuditEvent, Name, Version, VersionMeta
from registry.names import (
    ARTIFACT,
    alias_ref,
    artifact_ref,
    check_count,
    check_name,
    parse_int,
    parse_ref,
    split_kv,
    version_ref,
)

BUILTIN_WHERE = {"kind": Version.kind, "author": Version.author, "base_revision": Version.base_revision,
                 "r": Version.r, "mora_type": Version.mora_type}
NUMERIC_WHERE = ("r", "mora_type")
LIST_COLUMNS = (Version.id, Version.number, Version.digest, Version.created, Version.kind, Version.size,
                Version.author, Version.r, Version.mora_type, Version.base_model, Version.base_revision,
                Version.message, Version.meta, Version.parent_id, Name.name)


def list_versions(db: Database, name: str | None = None, *, base_model: str | None = None,
                  where: dict[str, str] | Iterable[str] | None = None, limit: int = 50,
                  offset: int = 0) -> list[VersionInfo]:
    """Versions, newest first; `where` matches metadata or the columns in BUILTIN_WHERE."""
    check_count(limit, "--limit")
    check_count(offset, "--offset")
    items = (where.items() if isinstance(where, dict)
             else [split_kv(w, "--where") for w in (where or ())])
    stmt = select(*LIST_COLUMNS).join(Name, Name.id == Version.name_id)
    with db.read() as s:
        if name is not None:
            nm = refs.name_row(s, check_name(name))
            stmt = stmt.where(Version.name_id == nm.id).order_by(Version.number.desc())
        else:
            stmt = stmt.order_by(Version.id.desc())
        if base_model is not None:
            stmt = stmt.where(Version.base_model == base_model)
        for k, val in items:
            if k in BUILTIN_WHERE:
                if k in NUMERIC_WHERE:
                    val = parse_int(val, f"--where {k}")
                stmt = stmt.where(BUILTIN_WHERE[k] == val)
            else:
                stmt = stmt.where(Version.id.in_(select(VersionMeta.version_id)
                                                 .where(VersionMeta.key == k, VersionMeta.value == val)))
        if limit:
            stmt = stmt.limit(limit)
        if offset:
            stmt = stmt.offset(offset)
        rows = s.execute(stmt).all()
        ids = [r.id for r in rows]
        aliases: dict[int, list[str]] = {}
        parents: dict[int, str] = {}
        if ids:
            for vid, alias in s.execute(select(Alias.version_id, Alias.alias)
                                        .where(Alias.version_id.in_(ids)).order_by(Alias.alias)):
                aliases.setdefault(vid, []).append(alias)
            pids = {r.parent_id for r in rows if r.parent_id is not None}
            if pids:
                for pid, num, pname in s.execute(select(Version.id, Version.number, Name.name)
                                                 .join(Name, Name.id == Version.name_id)
                                                 .where(Version.id.in_(pids))):
                    parents[pid] = version_ref(pname, num)
    return [refs.describe(r, r.name, aliases.get(r.id, []), parents.get(r.parent_id)) for r in rows]


def show(db: Database, ref: str) -> VersionInfo | ArtifactInfo:
    """Everything recorded about a version or an artifact."""
    if parse_ref(ref).is_artifact:
        return artifacts.artifact(db, ref)
    return refs.resolve(db, ref)


def events(db: Database, ref: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Audit events, oldest first: all; a name's; a version's (`name:N`, alias, digest); an artifact's."""
    check_count(limit, "--limit")
    stmt = select(AuditEvent)
    with db.read() as s:
        if ref is not None:
            r = parse_ref(ref)
            if r.is_artifact:
                stmt = stmt.where(AuditEvent.subject == artifact_ref(artifacts.artifact_row(s, ref).id))
            elif r.number is None and r.alias is None and r.digest_prefix is None:
                stmt = stmt.where(AuditEvent.name == r.name)
            else:
                label = refs.label(refs.version_row(s, r))
                quoted = json.dumps(label).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                stmt = stmt.where(AuditEvent.name == r.name,
                                  or_(AuditEvent.subject == label,
                                      AuditEvent.details.like(f"%{quoted}%", escape="\\")))
        if check_count(limit, "--limit"):
            stmt = stmt.order_by(AuditEvent.seq.desc()).limit(limit)
            return [event_dict(e) for e in reversed(s.scalars(stmt).all())]
        return [event_dict(e) for e in s.scalars(stmt.order_by(AuditEvent.seq))]


def complete_refs(db: Database, prefix: str, limit: int = 50) -> list[str]:
    """References starting with `prefix`, for shell completion: names, `name:N`, `name@alias`."""
    with db.read() as s:
        if "@" in prefix:
            name, _, start = prefix.partition("@")
            rows = s.scalars(select(Alias.alias).join(Name, Name.id == Alias.name_id)
                             .where(Name.name == name, Alias.alias.startswith(start, autoescape=True))
                             .order_by(Alias.alias).limit(limit))
            return [alias_ref(name, a) for a in rows]
        if ":" in prefix and not prefix.startswith(ARTIFACT):
            name, _, start = prefix.rpartition(":")
            rows = s.scalars(select(Version.number).join(Name, Name.id == Version.name_id)
                             .where(Name.name == name).order_by(Version.number.desc()))
            return [version_ref(name, n) for n in rows if str(n).startswith(start)][:limit]
        names = list(s.scalars(select(Name.name).where(Name.name.startswith(prefix, autoescape=True))
                               .order_by(Name.name).limit(limit)))
    return names + ([ARTIFACT + ":"] if ARTIFACT.startswith(prefix) and prefix else [])
