"""Reference -> row -> info: how a reference string finds its database row, and the one
place a version row becomes a `VersionInfo`.

`version_row` understands every reference form of `registry.names` (latest, `:N`, `@alias`,
`@sha256:prefix`) and raises a one-line `RegistryError` for unknown or ambiguous ones.
`describe` builds a VersionInfo from anything with a version's columns (an ORM row, or a
row of the list query), so a single and a listed version always look the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db import Database
from registry.errors import RegistryError
from registry.info import VersionInfo, utc
from registry.models import Alias, Name, Version
from registry.names import Ref, parse_ref, version_ref


def label(v: Version) -> str:
    """`name:N` of a version row."""
    return version_ref(v.adapter.name, v.number)


def did_you_mean(wanted: str, candidates: list[str]) -> str:
    """` (did you mean X?)` for the closest candidate, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(wanted, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def name_row(s: Session, name: str) -> Name:
    """The row of an adapter name; RegistryError (with the closest known name) if none was pushed."""
    nm = s.scalar(select(Name).where(Name.name == name))
    if nm is None:
        known = list(s.scalars(select(Name.name).order_by(Name.name).limit(10_000)))
        raise RegistryError(f"unknown adapter {name!r}{did_you_mean(name, known)}")
    return nm


def unknown_alias(s: Session, nm: Name, alias: str, shown: str) -> RegistryError:
    """`unknown alias SHOWN`, naming the closest existing alias of `nm`."""
    known = list(s.scalars(select(Alias.alias).where(Alias.name_id == nm.id)))
    close = did_you_mean(alias, known)
    return RegistryError(f"unknown alias {shown}" + (close.replace("mean ", f"mean {nm.name}@") if close else ""))


def version_row(s: Session, ref: str | Ref) -> Version:
    """The version row a reference names (not an artifact reference)."""
    r = parse_ref(ref) if isinstance(ref, str) else ref
    text = ref if isinstance(ref, str) else r.name
    if r.is_artifact:
        raise RegistryError(f"reference {text!r} names an artifact, not an adapter version")
    nm = name_row(s, r.name)
    if r.number is not None:
        v = s.scalar(select(Version).where(Version.name_id == nm.id, Version.number == r.number))
        if v is None:
            raise RegistryError(f"unknown version {text!r} (latest is {version_ref(r.name, nm.latest)})")
        return v
    if r.alias is not None:
        a = s.get(Alias, (nm.id, r.alias))
        if a is None:
            raise unknown_alias(s, nm, r.alias, repr(text))
        return a.version
    if r.digest_prefix is not None:
        return one_by_digest(
            s, select(Version).where(Version.name_id == nm.id), Version.digest, r.digest_prefix,
            missing=f"no version of {r.name!r} has digest sha256:{r.digest_prefix}...",
            ambiguous=lambda a, b: f"reference {text!r} is ambiguous ({a.number}, {b.number}, ...): "
                                   "give more digits")
    v = s.scalar(select(Version).where(Version.name_id == nm.id).order_by(Version.number.desc()).limit(1))
    if v is None:
        raise RegistryError(f"adapter {r.name!r} has no versions")
    return v


def one_by_digest(s: Session, query: Any, column: Any, prefix: str, *, missing: str,
                  ambiguous: Callable[[Any, Any], str]) -> Any:
    """The single row of `query` whose `column` starts with `sha256:<prefix>`, or a one-line error."""
    rows = s.scalars(query.where(column.startswith("sha256:" + prefix)).limit(2)).all()
    if not rows:
        raise RegistryError(missing)
    if len(rows) > 1:
        raise RegistryError(ambiguous(rows[0], rows[1]))
    return rows[0]


def describe(v: Any, name: str, aliases: list[str], parent: str | None) -> VersionInfo:
    """A VersionInfo from a version's columns (ORM row or query row) and what lives elsewhere."""
    return VersionInfo(name=name, number=v.number, digest=v.digest, created=utc(v.created), kind=v.kind,
                       size=v.size, author=v.author, r=v.r, mora_type=v.mora_type, base_model=v.base_model,
                       base_revision=v.base_revision, message=v.message, meta=json.loads(v.meta),
                       aliases=aliases, parent=parent, id=v.id)


def version_info(s: Session, v: Version, full: bool) -> VersionInfo:
    """Everything recorded about a version; `full` adds its spec and files."""
    info = describe(v, v.adapter.name, sorted(a.alias for a in v.aliases),
                    label(v.parent) if v.parent is not None else None)
    info.base_files = json.loads(v.base_files) if v.base_files else None
    if full:
        info.spec = json.loads(v.spec)
        info.files = [{"path": f.path, "digest": f.blob, "size": f.size, "mode": f.mode} for f in v.files]
    return info


def resolve(db: Database, ref: str) -> VersionInfo:
    """The version a reference names, in full; RegistryError for unknown or ambiguous references."""
    with db.read() as s:
        return version_info(s, version_row(s, ref), full=True)
