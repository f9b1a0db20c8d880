"""One run per folder: an exclusive flock on <run folder>/.llmtrain.lock, held by the CLI (and
inherited by the launcher it starts) for the whole run. The kernel drops the lock when the last
holder dies, so a killed run leaves no stale lock; the file keeps the holder's PID for the message."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from llmtrain.errors import UserError

LOCK_NAME = ".llmtrain.lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(f"--out {run_dir}: another llmtrain run (PID {holder}) is using this folder; wait "
                            "for it to end or choose another --out (nothing was changed)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self, failed: bool = False) -> None:
        """Unlock; a folder this run created and left empty (a refused start) is removed again."""
        if self.fd < 0:
            return
        if failed and self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            self.run_dir.rmdir()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None and not _clean_exit(exc))


def _clean_exit(exc) -> bool:
    """typer.Exit(0) and SystemExit(0) end a run normally."""
    return getattr(exc, "exit_code", getattr(exc, "code", 1)) in (0, None)
