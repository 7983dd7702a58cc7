"""The tamper-evident audit log: append-only events chained by hash.

    hash_n = sha256(hash_{n-1} + canonical(seq, at, actor, action, subject, name, details))

with hash_0 = 64 zeros. The chain head (last seq and hash) is also kept in the single
`registry_state` row, which every writer locks first: appends are serialised, and
deleting the newest events is detected as well as rewriting or deleting older ones.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import signing
from registry.config import actor
from registry.db import Database, lock_state
from registry.digests import canonical
from registry.errors import RegistryError
from registry.models import AuditEvent, State

GENESIS = "0" * 64
MAX_ACTION = 32


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def event_hash(prev: str, seq: int, at: str, who: str, action: str, subject: str,
               name: str | None, details: str) -> str:
    body = canonical([seq, at, who, action, subject, name, details])
    return hashlib.sha256((prev + body).encode("utf-8")).hexdigest()


def append(session: Session, action: str, subject: str, details: dict[str, Any],
           name: str | None = None) -> AuditEvent:
    """Append one event inside the caller's write transaction."""
    state = lock_state(session)
    seq = state.audit_seq + 1
    at = now_iso()
    who = actor()
    text = canonical(details)
    subject = subject[:300]  # hash exactly what is stored
    h = event_hash(state.audit_head, seq, at, who, action, subject, name, text)
    ev = AuditEvent(seq=seq, at=at, actor=who, action=action, subject=subject, name=name,
                    details=text, prev_hash=state.audit_head, hash=h)
    session.add(ev)
    state.audit_seq = seq
    state.audit_head = ev.hash
    signing.sign(state)
    return ev


def record(db: Database, action: str, subject: str, details: dict[str, Any],
           name: str | None = None) -> dict[str, Any]:
    """Append one event in its own write transaction (for other components: merge, export...)."""
    if not action or len(action) > MAX_ACTION:
        raise RegistryError(f"audit action {action!r}: 1 to {MAX_ACTION} characters")
    with db.writing() as s:
        ev = append(s, action, subject, details, name=name)
        s.flush()
        return event_dict(ev)


def verify_chain(session: Session, batch: int = 2000) -> list[str]:
    """Walk the whole chain; one line per problem (empty = intact)."""
    problems: list[str] = []
    prev = GENESIS
    expect = 1
    last = 0
    stmt = select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=batch)
    for ev in session.scalars(stmt):
        if ev.seq != expect:
            problems.append(f"audit events {expect}..{ev.seq - 1} were deleted")
        if ev.prev_hash != prev and ev.seq == expect:
            problems.append(f"audit event {ev.seq} does not follow event {ev.seq - 1} "
                            "(an earlier event was rewritten or replaced)")
        got = event_hash(ev.prev_hash, ev.seq, ev.at, ev.actor, ev.action, ev.subject, ev.name, ev.details)
        if got != ev.hash:
            problems.append(f"audit event {ev.seq} ({ev.action} {ev.subject}) was altered")
        prev = ev.hash
        expect = ev.seq + 1
        last = ev.seq
    state = session.get(State, 1)
    if state is None:
        problems.append("audit chain head (registry_state) is missing")
    elif state.audit_seq != last:
        problems.append(f"audit log ends at event {last} but the chain head says {state.audit_seq} "
                        "(newest events were deleted)")
    elif state.audit_head != prev:
        problems.append(f"audit event {last} differs from the recorded chain head (rewritten)")
    return problems


def event_dict(ev: AuditEvent) -> dict[str, Any]:
    """An event as the API and the CLI's --json show it."""
    return {"seq": ev.seq, "at": ev.at, "actor": ev.actor, "action": ev.action, "subject": ev.subject,
            "name": ev.name, "details": json.loads(ev.details), "hash": ev.hash}
