"""Fault injection for the crash and concurrency tests, so that they stop or slow a push at an
exact step instead of racing a timer:

- `ADAPTERS_CRASH_AT=<point>` SIGKILLs the process when it reaches that point;
- `ADAPTERS_PAUSE_AT=<point>:<seconds>` sleeps there (e.g. inside the write transaction, so
  that concurrent writers overlap for certain and only the writer lock keeps them apart).

Every point is listed in POINTS; tests/registry/test_crash.py kills a push at each one and
checks that this list matches the calls in the code. Unset, a point costs two dict lookups.
"""

from __future__ import annotations

import os
import signal
import time

CRASH_ENV = "ADAPTERS_CRASH_AT"
PAUSE_ENV = "ADAPTERS_PAUSE_AT"
POINTS = (
    "copying",        # a blob's bytes are partly copied into its temp file
    "staged",         # every file copied into a temp file, nothing fsynced yet
    "durable",        # temp files fsynced, not yet renamed to their digest
    "published",      # blobs renamed into place in the write transaction, no version rows yet
    "before_commit",  # rows, tags and audit event written, transaction not committed
    "committed",      # the version is committed; the process dies before returning
)


def fault_point(point: str) -> None:
    """Die here (SIGKILL, no cleanup) or pause, if the environment names this point."""
    if os.environ.get(CRASH_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        where, _, seconds = pause.partition(":")
        if where == point:
            time.sleep(float(seconds or 0))
