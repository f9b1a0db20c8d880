"""`python -m llmtrain.launch.ranks RANKS MASTER_PORT MODULE [ARGS...]`: one node's ranks, started
as DeepSpeed's per-node launcher (deepspeed.launcher.launch) starts them: `python -u -m MODULE
--local_rank=N ARGS...` with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE,
MASTER_ADDR and MASTER_PORT set. It imports neither torch nor DeepSpeed: DeepSpeed's launcher
spends 3 s of every run on 2 cores importing them to start two processes. CUDA_VISIBLE_DEVICES
is left as it is (DeepSpeed's sets it to 0..N-1; each rank takes the device of its LOCAL_RANK).

As with DeepSpeed's launcher, the first rank to exit non-zero ends the others (SIGTERM, then
SIGKILL past a grace) and its code is the launcher's, 128 + N for a rank ended by signal N; a
SIGINT or SIGTERM to the launcher ends every rank. Stop signals meant for the ranks go to them
directly (launch.local.run_launcher), not through here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 30  # as long as DeepSpeed's launcher waits for the ranks it ended


def rank_env(rank: int, ranks: int, port: str) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
            "LOCAL_SIZE": str(ranks), "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port}


def end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv: list[str]) -> int:
    ranks, port, module, *args = argv
    procs: list[subprocess.Popen] = []

    def ended(signum, frame):
        end(procs)
        sys.exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, ended)
    for rank in range(int(ranks)):
        procs.append(subprocess.Popen([sys.executable, "-u", "-m", module, f"--local_rank={rank}", *args],
                                      env=rank_env(rank, int(ranks), port)))
    while True:
        codes = [p.poll() for p in procs]
        failed = next((c for c in codes if c not in (None, 0)), None)
        if failed is not None:
            end(procs)
            return 128 - failed if failed < 0 else failed
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
