"""Aliases: movable labels (`prod`, `staging`) on versions of one name. Every move and
removal is an audit event carrying where the alias pointed before and after."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy.orm import Session

from registry import audit, refs
from registry.db import Database
from registry.info import VersionInfo
from registry.models import Alias, Name, Version
from registry.names import alias_ref, check_alias, check_name, version_ref


def move(s: Session, nm: Name, alias: str, v: Version) -> None:
    """Point `nm@alias` at `v` inside the caller's write transaction (audited; no-op if it does)."""
    a = s.get(Alias, (nm.id, alias))
    old = None
    if a is None:
        s.add(Alias(name_id=nm.id, alias=alias, version_id=v.id, updated=datetime.now(timezone.utc)))
    else:
        if a.version_id == v.id:
            return
        old = refs.label(a.version)
        a.version_id = v.id
        a.updated = datetime.now(timezone.utc)
    audit.append(s, "tag", alias_ref(nm.name, alias),
                 {"alias": alias, "from": old, "to": version_ref(nm.name, v.number)}, name=nm.name)


def tag(db: Database, ref: str, alias: str) -> VersionInfo:
    """Point `name@alias` at the version `ref` names (moving it if it exists; audited)."""
    check_alias(alias)
    with db.writing() as s:
        v = refs.version_row(s, ref)
        move(s, v.adapter, alias, v)
        s.flush()
        return refs.version_info(s, v, full=False)


def untag(db: Database, name: str, alias: str) -> str:
    """Remove an alias; returns the ref it pointed at (audited)."""
    check_name(name)
    with db.writing() as s:
        nm = refs.name_row(s, name)
        a = s.get(Alias, (nm.id, alias))
        if a is None:
            raise refs.unknown_alias(s, nm, alias, alias_ref(name, alias))
        was = refs.label(a.version)
        s.delete(a)
        audit.append(s, "untag", alias_ref(name, alias), {"alias": alias, "from": was}, name=name)
    return was
