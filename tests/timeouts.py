"""Hang guards for tests that wait on other processes: limits scaled to how busy the machine is.

A limit in the tests is never a claim about speed: it only stops a hung child process (a
subprocess, a rank waiting in a collective) from hanging the suite. A fixed limit fails a healthy
run on a small, loaded machine (CI's 2 cores; ``make test`` under ``nice`` at load 8, where a
spawned rank's imports alone took minutes), so every limit is ``scaled(seconds)``: the base value
(generous on an idle machine) times the load per CPU when that exceeds 1, times
``PRUNEPLAN_TEST_TIME_SCALE`` (default 1; set it on slow or niced runs, e.g. 10).
"""

from __future__ import annotations

import os


def factor() -> float:
    """How much longer than on an idle machine things may take now (>= 1)."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):  # not available on this platform
        load = 1.0
    try:
        user = float(os.environ.get("PRUNEPLAN_TEST_TIME_SCALE", "1"))
    except ValueError:
        user = 1.0
    return max(1.0, load) * max(1.0, user)


def scaled(seconds: float) -> float:
    """``seconds`` (the limit on an idle machine) scaled by `factor`."""
    return seconds * factor()
