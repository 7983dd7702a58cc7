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
from pathlib import Path

CRASH_ENV = "ADAPTERS_CRASH_AT"
PAUSE_ENV = "ADAPTERS_PAUSE_AT"
SIGNAL_ENV = "ADAPTERS_PAUSE_SIGNAL"
MERGE_POINTS = (  # in exporters: a merge killed around its output (not push points: not in POINTS)
    "output_written",  # every file written in the partial folder, not yet renamed into place
    "output_placed",   # renamed into place and recorded, not yet registered as an artifact
)
PAUSE_ONLY = (
    "verify_listed",  # verify has read the blob and version rows, not yet looked at any blob file
)
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
    pause_point(point)


def pause_point(point: str) -> None:
    """Pause here if `ADAPTERS_PAUSE_AT=<point>:<seconds>` names this point (readers' points,
    such as verify's, only pause: see PAUSE_ONLY).

    With `ADAPTERS_PAUSE_SIGNAL=<folder>` the pause is a barrier: `<folder>/<point>.reached`
    is created on arrival and the process waits for `<folder>/<point>.go` (at most the
    seconds), so a test knows the point was reached and decides when to go on.
    """
    pause = os.environ.get(PAUSE_ENV)
    if not pause:
        return
    where, _, seconds = pause.partition(":")
    if where != point:
        return
    folder = os.environ.get(SIGNAL_ENV)
    if not folder:
        time.sleep(float(seconds or 0))
        return
    Path(folder, f"{point}.reached").touch()
    deadline = time.monotonic() + float(seconds or 0)
    while not Path(folder, f"{point}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
