"""Builds and runs the launcher command that starts one worker per rank, and forwards stop signals
so that every rank saves before the job ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from llmtrain.recipe import Recipe

WORKER_MODULE = "llmtrain.train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(run_dir: Path, resume: Path | None, stop_after: int | None) -> list[str]:
    args = [str(run_dir)]
    if resume is not None:
        args += ["--resume", str(resume)]
    if stop_after is not None:
        args += ["--stop-after", str(stop_after)]
    return args


def local_command(recipe: Recipe, args: list[str]) -> list[str]:
    """One node, `launch.ranks_per_node` workers, through DeepSpeed's launcher or torchrun."""
    port = str(recipe.launch.master_port or free_port())
    n = str(recipe.launch.ranks_per_node)
    if recipe.launch.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--master_port", port,
                "-m", WORKER_MODULE, *args]
    # DeepSpeed's launcher appends --local_rank=N to the worker's arguments; the worker accepts it.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", "--num_gpus", n,
            "--master_port", port, "--module", WORKER_MODULE, *args]


# DeepSpeed's multi-node launchers; `slurm` runs `srun` from inside an allocation (salloc/sbatch).
MULTINODE_LAUNCHERS = ("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm")


def hostfile_command(recipe: Recipe, hostfile: Path, launcher: str, launcher_args: list[str],
                     args: list[str]) -> list[str]:
    """Every host of a DeepSpeed hostfile, through DeepSpeed's multi-node launcher. Options after
    `--` on the llmtrain command line (`--include`, `--master_addr`, `--ssh_port`, ...) pass through."""
    port = str(recipe.launch.master_port or 29500)  # every node must agree: no free-port probing here
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", "--hostfile", str(hostfile),
           "--master_port", port, "--launcher", launcher, *launcher_args]
    if launcher == "slurm":
        # DeepSpeed's srun line runs a script (it has no --module) and sets no RANK/WORLD_SIZE:
        # the worker maps SLURM's variables itself.
        return cmd + [str(Path(__file__).parents[1] / "train" / "__main__.py"), *args, "--slurm"]
    return cmd + ["--module", WORKER_MODULE, *args]


def worker_env(ranks_per_node: int) -> dict[str, str]:
    env = dict(os.environ)
    # Ranks share the machine's cores: without this each rank starts one thread per core and
    # they thrash. A user's own OMP_NUM_THREADS wins.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # said explicitly, DeepSpeed skips its detection warning
    return env


def run_launcher(cmd: list[str], ranks_per_node: int) -> int:
    """Run the launcher in its own process group and wait for it. A SIGINT/SIGTERM/SIGUSR1 sent
    to us goes to the workers only (they finish the step, save and exit 0, and the launcher then
    exits cleanly); we return once every process of the group is gone."""
    proc = subprocess.Popen(cmd, env=worker_env(ranks_per_node), start_new_session=True)

    def forward(signum, frame):
        workers = _workers(proc.pid)
        for w in workers:
            with contextlib.suppress(psutil.Error):
                w.send_signal(signum)
        if not workers:  # still starting up: stop the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = proc.wait()
        _wait_group_gone(proc.pid)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def _workers(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if _is_worker(child.cmdline()):
                found.append(child)
    return found


def _is_worker(cmdline: list[str]) -> bool:
    return any(part == WORKER_MODULE or part.endswith("llmtrain/train/__main__.py") for part in cmdline)


def _wait_group_gone(pgid: int) -> None:
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
