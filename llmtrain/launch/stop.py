"""The stop signals, and what a first one does before any rank exists (torch-free: `run` uses it
before it imports the launcher)."""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(BaseException):
    """A stop signal before any rank existed: nothing to save, the command ends at once. Not an
    Exception: no `except Exception` on the way (an estimate, a probe) may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_before_launch():
    """While the run prepares (data, checks, the run folder), a stop signal raises Interrupted where
    the command is: open pools and files close on the way out, and a half-prepared data cache is
    continued by the next run (data.prepare keeps whole shards). Without this SIGTERM and SIGUSR1
    would kill the command without a word, and SIGINT would end as a failure (exit 1)."""
    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
