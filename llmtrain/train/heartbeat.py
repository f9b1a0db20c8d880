"""Heartbeats: each rank touches run_dir/.heartbeat/rank<N> whenever it makes progress (started,
a step, an eval pass, a checkpoint saved). The launcher's watchdog reads their times from outside
the ranks, so a rank that is stopped, dead or stuck in a collective cannot hide a hang. A rank
that ends normally writes its exit code into the file last."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HEARTBEAT_DIR = ".heartbeat"


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return run_dir / HEARTBEAT_DIR / f"rank{rank}"


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int):
        self.path = heartbeat_path(run_dir, rank)
        self.path.parent.mkdir(exist_ok=True)
        self.path.write_text(f"{os.getpid()}\n")

    def close(self, code: int) -> None:
        """Say how this rank ended, so the watchdog tells a rank that finished from one that died."""
        try:
            self.path.write_text(f"{os.getpid()} exited {code}\n")
        except OSError:
            pass

    def beat(self) -> None:
        try:
            os.utime(self.path)
        except OSError:  # a full disk or a removed folder must not end training; the watchdog then decides
            pass


def last_beats(run_dir: Path, world_size: int) -> dict[int, float | None]:
    """Each rank's last heartbeat time (None: not started yet)."""
    beats = {}
    for rank in range(world_size):
        try:
            beats[rank] = heartbeat_path(run_dir, rank).stat().st_mtime
        except OSError:
            beats[rank] = None
    return beats


def exit_code(run_dir: Path, rank: int) -> int | None:
    """The code a rank said it exited with, or None (still running, or it died without a word)."""
    try:
        words = heartbeat_path(run_dir, rank).read_text().split()
    except OSError:
        return None
    return int(words[2]) if len(words) == 3 and words[1] == "exited" else None


def clear_heartbeats(run_dir: Path) -> None:
    """An earlier attempt's heartbeats would look like a hang: remove them before ranks start."""
    shutil.rmtree(run_dir / HEARTBEAT_DIR, ignore_errors=True)
