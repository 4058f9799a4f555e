"""A reward that crashes its run on a chosen call, to test `prefloop tune --resume`."""

from __future__ import annotations

import os
import signal

KILL_ENV = "PREFLOOP_TEST_KILL_AT_CALL"  # kill -9 the process on this call (a subprocess run)
crash_at: int | None = None  # raise on this call (an in-process run); set by a test
calls = 0


def shorter(prompt: str, completion: str) -> float:
    """Prefer the shorter completion; crash on the chosen call."""
    global calls
    calls += 1
    if os.environ.get(KILL_ENV) and calls == int(os.environ[KILL_ENV]):
        os.kill(os.getpid(), signal.SIGKILL)
    if crash_at is not None and calls == crash_at:
        raise RuntimeError("the reward service went away")
    return -len(completion)
