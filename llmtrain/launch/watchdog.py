"""The launcher's watchdog: ends the whole job when its ranks stop making progress, from outside
them (a stopped or dead rank cannot be relied on to report itself, and the others sit in a
collective waiting for it).

Every poll it reads the ranks' heartbeats (llmtrain.train.heartbeat) and the worker processes'
states. The job has progressed as long as its slowest rank has: when no heartbeat of some rank is
newer than `timeout_s` (counted from the launch for a rank that has not started), it is hung.
The culprit is named from what is seen: a rank stopped by a signal, the first rank to disappear,
or else the rank with the oldest heartbeat. When a rank has died, the others are ended a few
seconds later instead of waiting for their collective to fail.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psutil

from llmtrain.train.heartbeat import exit_code, last_beats

STOPPED = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


class Watchdog:
    def __init__(self, run_dir: Path, world_size: int, timeout_s: float):
        self.run_dir, self.world, self.timeout_s = run_dir, world_size, timeout_s
        self.started = time.time()
        self.ranks: dict[int, psutil.Process] = {}  # local workers by rank
        self.culprit: str | None = None
        self.dead_at: float | None = None  # when a rank was first seen gone

    def survivors_stuck(self, grace_s: float = 5.0) -> bool:
        """A rank has been gone for `grace_s` and the job is still up: the others wait for it in a
        collective (DeepSpeed's launcher waits 30 s more before it kills them)."""
        return self.dead_at is not None and time.time() - self.dead_at > grace_s

    def watch(self, workers: list[psutil.Process]) -> str | None:
        """One poll over the current worker processes; the reason to end the job, or None."""
        for proc in workers:
            if proc.pid not in {p.pid for p in self.ranks.values()}:
                with contextlib.suppress(psutil.Error, KeyError, ValueError):
                    self.ranks[int(proc.environ()["RANK"])] = proc
        for rank, proc in sorted(self.ranks.items()):
            try:
                state = proc.status()
            except psutil.NoSuchProcess:
                state = psutil.STATUS_DEAD
            if state in STOPPED:
                self.culprit = f"rank {rank} (PID {proc.pid}) is stopped (SIGSTOP or a debugger)"
            elif state in (psutil.STATUS_DEAD, psutil.STATUS_ZOMBIE) and self.culprit is None:
                said = exit_code(self.run_dir, rank)
                if said == 0:
                    continue  # finished its work; the others are finishing theirs
                how = "died (killed, or crashed without a word)" if said is None else f"exited with code {said}"
                self.culprit = f"rank {rank} (PID {proc.pid}) {how} first"
                self.dead_at = time.time()
        beats = {r: t or self.started for r, t in last_beats(self.run_dir, self.world).items()}
        slowest = min(beats, key=beats.get)
        idle = time.time() - max(beats[slowest], self.started)
        if idle <= self.timeout_s:
            return None
        who = self.culprit or f"rank {slowest} made no progress (oldest heartbeat)"
        return f"{who}; no progress for {idle:.0f} s, more than launch.timeout_s={self.timeout_s:g}"
