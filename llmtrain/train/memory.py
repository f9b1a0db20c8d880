"""Peak memory of this process, for the live view, metrics.jsonl and `llmtrain profile`.

CUDA: the caching allocator's peak of allocated bytes. CPU: the resident-set high-water mark
(VmHWM), which Linux lets a process reset by writing 5 to /proc/self/clear_refs.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path
from typing import Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# Entries of CUDA allocator history kept for a memory_viz snapshot.
SNAPSHOT_ENTRIES = 100_000


def peak_bytes(reset: bool = False) -> int:
    """Peak bytes since the last reset (or since start), then optionally reset the mark."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated()
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak
    peak = _vm_hwm()
    if reset:
        reset_cpu_peak()
    return peak


def memory_source() -> str:
    return "cuda max_memory_allocated" if torch.cuda.is_available() and torch.cuda.is_initialized() else "peak RSS (VmHWM)"


def resident_bytes() -> int:
    return _status_kib("VmRSS:") * 1024 if _STATUS.exists() else 0


def reset_cpu_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:  # not Linux, or not permitted: the mark then covers the whole process life
        return False


def _vm_hwm() -> int:
    if _STATUS.exists():
        return _status_kib("VmHWM:") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


@contextlib.contextmanager
def oom_snapshot(run_dir: str | Path, rank: int = 0) -> Iterator[None]:
    """Wrap the training loop: on CUDA, record the allocator history and, when the loop dies of
    out-of-memory, dump it to RUN_DIR/memory-oom-rank{rank}.pickle before the error propagates.
    A no-op on CPU."""
    if not torch.cuda.is_available():
        yield
        return
    # Python stacks only: C++ stack capture on every allocation would slow training down.
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=SNAPSHOT_ENTRIES)
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        path = Path(run_dir) / f"memory-oom-rank{rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        print(f"CUDA out of memory: allocator history saved to {path} (open it in https://pytorch.org/memory_viz)",
              file=sys.stderr, flush=True)
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
