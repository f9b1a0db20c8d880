"""Peak memory of this process, for the live view, metrics.jsonl and `llmtrain profile`.

CUDA: the caching allocator's peak of allocated bytes. CPU: the resident-set high-water mark
(VmHWM), which Linux lets a process reset by writing 5 to /proc/self/clear_refs.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


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
