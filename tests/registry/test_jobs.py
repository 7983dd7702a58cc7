"""Batch-job leases in the registry: one runner per key, takeover from dead or expired owners."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from registry.jobs import owner_alive

KEY = "sha256:" + "ab" * 32


def test_a_live_lease_is_busy_and_a_dead_owner_is_taken_over(reg):
    me = f"{socket.gethostname()}:{os.getpid()}"
    parent = f"{socket.gethostname()}:{os.getppid()}"  # alive for the whole test
    assert reg.claim_job(KEY, "/out", parent).status == "claimed"
    busy = reg.claim_job(KEY, "/out", me)
    assert busy.status == "busy" and busy.owner == parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = f"{socket.gethostname()}:{int(dead.stdout)}"
    assert not owner_alive(ghost) and owner_alive(parent) and owner_alive("other-host:1")
    key2 = "sha256:" + "cd" * 32
    assert reg.claim_job(key2, "/o2", ghost).status == "claimed"
    assert reg.claim_job(key2, "/o2", me).status == "claimed"  # the ghost's lease is free at once


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_expired_lease_of_another_host_is_taken_over(reg):
    from registry.models import BatchJob

    assert reg.claim_job(KEY, "/out", "elsewhere:42").status == "claimed"
    assert reg.claim_job(KEY, "/out", "here:1").status == "busy"
    with reg.db.writing() as s:
        s.get(BatchJob, KEY).lease_expires = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert reg.claim_job(KEY, "/out", "here:1").status == "claimed"
    reg.finish_job(KEY, "elsewhere:42", None, "late result")  # the old owner's result no longer counts
    assert reg.claim_job(KEY, "/out", "third:3").status == "busy"
    reg.finish_job(KEY, "here:1", None, "boom")
    assert reg.claim_job(KEY, "/out", "third:3").status == "claimed"  # a failed job is run again
