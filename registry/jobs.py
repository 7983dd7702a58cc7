"""Leases and results of batch jobs: at most one runner per job key, and a cache of results.

A job key is the digest of a job's inputs (computed by the exporters). The table row
for a key says who runs it (`owner` = `host:pid`, with a lease that the runner renews
while it works) or what it produced (`artifact_id`). Every decision is taken inside
the registry's write transaction (one writer at a time), so two runners of the same
plan never both claim a key. A lease is free when it expired, or when its owner is a
process of this host that no longer exists (a killed runner's jobs can be taken over
at once on the same machine; on another machine after the lease expires).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy.orm import Session

from registry.models import BatchJob

LEASE_SECONDS = 120


def this_owner() -> str:
    """`host:pid` of this process (the worker/owner form batch reports use)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """False when `owner` is a process of this host that is gone; True otherwise (unknowable)."""
    if not owner:
        return False
    from registry.outputs import process_alive

    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return process_alive(int(pid))


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: `claimed` (run it), `cached` (artifact_id) or `busy` (owner runs it)."""

    status: str
    artifact_id: int | None = None
    owner: str | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


def claim(s: Session, key: str, output: str, owner: str, *, reuse_done: bool = True,
          lease_seconds: int = LEASE_SECONDS) -> Claim:
    """Take the lease of `key` for `owner` unless a live lease or (with `reuse_done`) a result exists."""
    now = _now()
    row = s.get(BatchJob, key)
    if row is None:
        s.add(BatchJob(key=key, output=output, status="running", owner=owner,
                       lease_expires=now + timedelta(seconds=lease_seconds), updated=now))
        return Claim("claimed")
    if row.status == "done" and row.artifact_id is not None and reuse_done:
        return Claim("cached", artifact_id=row.artifact_id)
    expires = _aware(row.lease_expires)
    if (row.status == "running" and row.owner != owner and expires is not None and expires > now
            and owner_alive(row.owner)):
        return Claim("busy", owner=row.owner)
    row.status, row.owner, row.output, row.error = "running", owner, output, None
    row.lease_expires, row.updated = now + timedelta(seconds=lease_seconds), now
    return Claim("claimed")


def renew(s: Session, keys: list[str], owner: str, lease_seconds: int = LEASE_SECONDS) -> None:
    """Push the leases `owner` holds on `keys` forward."""
    now = _now()
    for key in keys:
        row = s.get(BatchJob, key)
        if row is not None and row.owner == owner and row.status == "running":
            row.lease_expires, row.updated = now + timedelta(seconds=lease_seconds), now


def finish(s: Session, key: str, owner: str, artifact_id: int | None, error: str | None = None) -> None:
    """Record the result of a job `owner` ran: done with `artifact_id`, or failed with `error`."""
    row = s.get(BatchJob, key)
    if row is None or row.owner != owner:
        return  # the lease was taken over (expired): the other runner's result stands
    row.status = "failed" if error is not None else "done"
    row.artifact_id, row.error = artifact_id, error
    row.owner, row.lease_expires, row.updated = None, None, _now()


def release(s: Session, key: str, owner: str) -> None:
    """Give a lease back without a result (the job was not run)."""
    row = s.get(BatchJob, key)
    if row is not None and row.owner == owner and row.status == "running":
        row.status, row.owner, row.lease_expires, row.updated = "failed", None, None, _now()
        row.error = row.error or "not run"


def wrote_output(s: Session, output: str) -> BatchJob | None:
    """The newest job that registered an artifact at `output` (so a re-run may replace it)."""
    from sqlalchemy import select

    return s.scalars(select(BatchJob).where(BatchJob.output == output, BatchJob.artifact_id.is_not(None))
                     .order_by(BatchJob.updated.desc()).limit(1)).first()
