import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_head_distributed(spec: dict, stage: int, steps: int = 6, ranks: int = 2, tie: bool = False) -> list[float]:
    """Per-step mean losses of a tiny model with `spec`'s head, trained under DeepSpeed ZeRO
    `stage` with `ranks` real ranks (torchrun, gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={free_port()}", str(TESTS / "distributed_head_run.py"),
           json.dumps(spec), str(stage), str(steps)] + (["tie"] if tie else [])
    # the ranks import llmtrain from this checkout, not from wherever the package is installed
    pythonpath = os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        pytest.fail(f"distributed run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("LOSSES "))
    return json.loads(line[len("LOSSES "):])
