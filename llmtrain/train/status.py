"""status.yaml: how this attempt of a run stands. The CLI writes it as `running` before the ranks
start; rank 0 (or the rank that failed) writes the outcome; the CLI fills in a failure the ranks
could not report (a crash, a hang). A requeue loop reads `state` and the exit code, never an
earlier attempt's file.

States and exit codes: complete / stopped (a signal or --stop-after; saved) exit 0; failed 1;
diverged 3; hung (the watchdog ended the job) 124; interrupted (a second Ctrl-C/SIGTERM) 128+signal.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

STATUS = "status.yaml"
EXIT_FAILED, EXIT_DIVERGED, EXIT_HUNG = 1, 3, 124


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """Replace status.yaml atomically. `reason` comes first: the SLURM script greps '^reason: complete'."""
    body = {"reason": fields.pop("reason", state), "state": state, **fields, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = run_dir / f".{STATUS}.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(body, sort_keys=False))
    os.replace(tmp, run_dir / STATUS)


def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        status = yaml.safe_load((run_dir / STATUS).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return status if isinstance(status, dict) else {}
