"""A stand-in rank for tests/test_launch_ranks.py: `python -m rank_probe --local_rank=N OUT
[RANK=ACTION ...]` records its arguments, pid and distributed environment in OUT/rank<RANK>.json,
then does what its rank is told: exit<CODE> (default exit0), sleep (two minutes) or kill
(SIGKILL to itself)."""

import json
import os
import signal
import sys
import time
from pathlib import Path

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")

out, plans = Path(sys.argv[2]), dict(p.split("=") for p in sys.argv[3:])
rank = os.environ["RANK"]
(out / f"rank{rank}.json").write_text(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(),
                                                   "env": {k: os.environ.get(k) for k in ENV}}))
action = plans.get(rank, "exit0")
if action == "sleep":
    time.sleep(120)
elif action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(action.removeprefix("exit")) if action.startswith("exit") else 0)
