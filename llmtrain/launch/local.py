"""Builds and runs the launcher command that starts one worker per rank, forwards stop signals so
that every rank saves before the job ends, and ends a job whose ranks stop making progress."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from llmtrain.launch.stop import STOP_SIGNALS
from llmtrain.recipe import Recipe
from llmtrain.train.heartbeat import heartbeat_path

WORKER_MODULE = "llmtrain.train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(run_dir: Path, resume: Path | None, stop_after: int | None, allow_data_change: bool = False) -> list[str]:
    args = [str(run_dir)]
    if resume is not None:
        args += ["--resume", str(resume)]
    if stop_after is not None:
        args += ["--stop-after", str(stop_after)]
    if allow_data_change:
        args.append("--allow-data-change")
    return args


def local_command(recipe: Recipe, args: list[str]) -> list[str]:
    """One node, `launch.ranks_per_node` workers, through launch.ranks or torchrun."""
    port = str(recipe.launch.master_port or free_port())
    n = str(recipe.launch.ranks_per_node)
    if recipe.launch.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--master_port", port,
                "-m", WORKER_MODULE, *args]
    # DeepSpeed's conventions (--local_rank=N among the worker's arguments: the worker accepts it),
    # from a launcher that imports neither torch nor DeepSpeed (launch.ranks): DeepSpeed's own
    # runner and per-node launcher took 6 s of every launch importing them.
    return [sys.executable, "-m", "llmtrain.launch.ranks", n, port, WORKER_MODULE, *args]


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


@dataclasses.dataclass
class LaunchOutcome:
    code: int  # the launcher's exit code
    hung: str | None = None  # the watchdog ended the job: why, naming the rank
    culprit: str | None = None  # a rank seen stopped or ending first
    interrupted: int | None = None  # a stop signal ended the job at once (a second one, or one before any rank)
    before_ranks: bool = False  # that signal came while the launcher was still starting the ranks


def run_launcher(cmd: list[str], ranks_per_node: int, *, run_dir: Path | None = None, world_size: int = 1,
                 timeout_s: float | None = None, keep_fds: tuple[int, ...] = ()) -> LaunchOutcome:
    """Run the launcher in its own process group and wait for it. A SIGINT/SIGTERM/SIGUSR1 sent
    to us goes to the workers only (they finish the step, save and exit 0); a second SIGINT/SIGTERM
    kills the whole group at once (an unfinished save stays invisible: its marker is written last).
    One that comes before every rank is ready for it (has written its heartbeat file) ends the
    launch at once (outcome.before_ranks): nothing was trained, nothing to save.
    With `run_dir` and `timeout_s`, a watchdog kills the group when the ranks' heartbeats stop.
    We return once every process of the group is gone."""
    from llmtrain.launch.watchdog import Watchdog

    outcome = LaunchOutcome(code=0)
    signals_seen = []
    proc = None  # the launcher, once started
    ranks_ready = False  # from then on a first signal is the ranks' to act on, even once they have ended

    def forward(signum, frame):
        signals_seen.append(signum)
        if proc is None:  # the launcher is not started (or being started): it must not start ranks
            outcome.interrupted, outcome.before_ranks = signum, True
            return
        if len(signals_seen) > 1 and signum != signal.SIGUSR1:
            outcome.interrupted = signum
            _kill_group(proc.pid)
            return
        workers = _workers(proc.pid)
        if ranks_ready or _ready(run_dir, workers):
            for w in workers:
                with contextlib.suppress(psutil.Error):
                    w.send_signal(signum)
        else:  # still starting (a rank without its handler would die of it): nothing to save, end them all
            outcome.interrupted, outcome.before_ranks = signum, True
        if not workers or outcome.before_ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    watchdog = Watchdog(run_dir, world_size, timeout_s) if run_dir is not None and timeout_s else None
    # Our handlers come first: a signal while the launcher is being started is not missed.
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        if outcome.interrupted is not None:
            return outcome
        proc = subprocess.Popen(cmd, env=worker_env(ranks_per_node), start_new_session=True, pass_fds=keep_fds)
        if outcome.interrupted is not None:  # it came while the launcher was being started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        while proc.poll() is None:
            workers = _workers(proc.pid)
            ranks_ready = ranks_ready or _ready(run_dir, workers)
            if watchdog and outcome.hung is None and (reason := watchdog.watch(workers)):
                outcome.hung = reason
                _kill_group(proc.pid)
            elif watchdog and watchdog.survivors_stuck():
                _kill_group(proc.pid)  # a failure, not a hang: the rank that died is named
            time.sleep(0.2)  # often enough to tell which rank ended first
        outcome.code = proc.returncode
        # The launcher is gone; a rank it could not end (stopped, stuck) must not outlive the job.
        # After our SIGKILL nothing is left to wait for (the kernel ends them; zombies do not run).
        if outcome.hung is None and (outcome.interrupted is None or outcome.before_ranks):
            _wait_group_gone(proc.pid, grace_s=10.0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if watchdog:
        outcome.culprit = watchdog.culprit
    return outcome


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


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


def _ready(run_dir: Path | None, workers: list[psutil.Process]) -> bool:
    """Every rank seen has its stop handler in place: the worker installs it before it writes its
    heartbeat file (without a run folder to look in, the ranks existing is all we know)."""
    if not workers or run_dir is None:
        return bool(workers)
    try:
        return all(heartbeat_path(run_dir, int(w.environ()["RANK"])).exists() for w in workers)
    except (psutil.Error, KeyError, ValueError):
        return False


def _is_worker(cmdline: list[str]) -> bool:
    """A rank itself, not a launcher that names the worker module among its own arguments (a
    signal meant for the ranks must not reach a launcher, which would end or signal them itself)."""
    args = cmdline[1:]
    for i, arg in enumerate(args):  # the interpreter's options, then `-m MODULE` or a script
        if arg == "-m":
            return args[i + 1:i + 2] == [WORKER_MODULE]
        if not arg.startswith("-"):
            return arg.endswith("llmtrain/train/__main__.py")
    return False


def _wait_group_gone(pgid: int, grace_s: float) -> None:
    """Wait for the group to empty; past the grace, kill what is left, then give up after a few
    seconds more (an unreaped zombie, in a container without an init, never leaves)."""
    deadline = time.time() + grace_s
    while time.time() < deadline + 5:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.time() > deadline:
            _kill_group(pgid)
        time.sleep(0.2)
