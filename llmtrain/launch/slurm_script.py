"""The sbatch script for a recipe (`llmtrain launch slurm`): one srun task per GPU, preemption-safe.

How a job runs:
Every value in the shell part is quoted (shlex.quote); the #SBATCH lines, which cannot be quoted,
take only names and paths of safe characters (checked here).

1. One process on the first node prepares the data, the run folder and, when the world size or
   ZeRO stage changed since the last checkpoint, its universal copy (`llmtrain run --prepare-only`).
2. `srun` starts one worker per GPU; each maps SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS /
   SLURM_JOB_NODELIST to RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR (`llmtrain.train --slurm`).
3. SLURM's warning signal (`--signal=B:USR1@...`, before the time limit) and a preemption's or
   scancel's SIGTERM reach the batch shell, which forwards them to srun, which passes them to every
   task: the ranks finish the step, save a checkpoint and exit 0.
4. If the schedule is not finished, the script requeues its own job, which continues with
   `--resume auto`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from llmtrain.errors import UserError

# SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
TIME_FORMAT = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")


def check_time(value: str | None) -> None:
    if value is not None and not TIME_FORMAT.match(value):
        raise UserError(f"--time {value!r}: use a SLURM time limit such as 90 (minutes), 4:00:00 or 2-00:00:00")


# #SBATCH options the script sets itself (long and short names), and what sets them instead
OWN_OPTIONS = {"nodes": "--nodes", "N": "--nodes", "ntasks-per-node": "--gpus-per-node",
               "gpus-per-node": "--gpus-per-node", "partition": "--partition", "p": "--partition", "time": "--time",
               "t": "--time", "account": "--account", "A": "--account", "qos": "--qos", "q": "--qos",
               "constraint": "--constraint", "C": "--constraint", "cpus-per-task": "--cpus-per-task",
               "c": "--cpus-per-task", "job-name": "the recipe's name", "J": "the recipe's name"}
OWN_OPTIONS.update(dict.fromkeys(["requeue", "open-mode", "output", "o", "signal"], "the preemption-safe requeue"))


def sbatch_lines(account: str | None, qos: str | None, constraint: str | None, extra: list[str]) -> list[str]:
    """The #SBATCH options of --account, --qos, --constraint and each --sbatch-line, checked: one
    option per line, none that the script sets itself."""
    lines = []
    for flag, value in (("--account", account), ("--qos", qos)):
        if value is not None:
            if not SAFE_NAME.match(value):
                raise UserError(f"{flag} {value!r}: not a SLURM name (letters, digits, _ . -)")
            lines.append(f"{flag}={value}")
    if constraint is not None:
        if not constraint.isprintable() or not constraint or any(c.isspace() for c in constraint):
            raise UserError(f"--constraint {constraint!r}: node features without spaces, e.g. 'a100&ib'")
        lines.append(f"--constraint={constraint}")
    for line in extra:
        option = line.strip().removeprefix("#SBATCH").strip()
        name = option.lstrip("-").split("=")[0].split(" ")[0]
        if not option.startswith("-") or not name or not option.isprintable():
            raise UserError(f"--sbatch-line {line!r}: one sbatch option on one line, e.g. --sbatch-line=--mail-type=END")
        if name in OWN_OPTIONS:
            raise UserError(f"--sbatch-line {line!r}: the script sets this option from {OWN_OPTIONS[name]}")
        lines.append(option)
    return lines


def one_line(text: str) -> str:
    """Text for a comment line: a newline in it would start a shell line."""
    return text.encode("unicode_escape").decode("ascii")


def render(*, recipe: Path, overrides: list[str], run_dir: Path, nodes: int, gpus_per_node: int, job_name: str,
           python: str, partition: str | None = None, time_limit: str | None = None, warn_seconds: int = 180,
           cpus_per_task: int | None = None, account: str | None = None, qos: str | None = None,
           constraint: str | None = None, extra_lines: list[str] = ()) -> str:
    """The script text. Paths are made absolute: the job starts in the submit directory, but a
    requeued job may not."""
    check_time(time_limit)
    if partition is not None and not SAFE_NAME.match(partition):
        raise UserError(f"--partition {partition!r}: not a SLURM partition name")
    extra = sbatch_lines(account, qos, constraint, list(extra_lines))
    if not SAFE_NAME.match(job_name):
        raise UserError(f"name {job_name!r}: a SLURM job name of letters, digits, '_', '.', '-' only")
    # #SBATCH lines are not shell: they cannot be quoted, so their paths must need no quoting.
    log_dir = run_dir.parent.absolute()
    if not SAFE_PATH.match(str(log_dir / run_dir.name)):
        raise UserError(f"--out {run_dir}: the SLURM log is written beside it, and its path may hold only letters, "
                        "digits, '/', '_', '.', '-' and '+' (no spaces, quotes, '%' or newlines); choose another --out")
    q = shlex.quote
    sbatch = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={gpus_per_node}",
              f"--gpus-per-node={gpus_per_node}"]
    if cpus_per_task:
        sbatch.append(f"--cpus-per-task={cpus_per_task}")
    if partition:
        sbatch.append(f"--partition={partition}")
    if time_limit:
        sbatch.append(f"--time={time_limit}")
    sbatch += extra
    sbatch += ["--requeue", "--open-mode=append", f"--output={log_dir / (run_dir.name + '-slurm-%j.out')}",
               f"--signal=B:USR1@{warn_seconds}"]
    header = "\n".join(f"#SBATCH {line}" for line in sbatch)
    all_overrides = " ".join(q(o) for o in [*overrides, f"launch.nodes={nodes}", f"launch.ranks_per_node={gpus_per_node}"])
    return f"""#!/bin/bash
# Written by `llmtrain launch slurm` for {one_line(recipe.name)}: {nodes} node(s) x {gpus_per_node} GPU(s), one srun task per GPU.
# Submit with `sbatch THIS_FILE`. Preemption-safe: USR1 (sent {warn_seconds} s before the time limit) and TERM
# (scancel, preemption) make every rank save and exit; an unfinished run requeues this job, which resumes.
{header}
set -uo pipefail

RECIPE={q(str(recipe.absolute()))}
RUN_DIR={q(str(run_dir.absolute()))}
PYTHON=${{LLMTRAIN_PYTHON:-{q(python)}}}
OVERRIDES=({all_overrides})
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{cpus_per_task or 8}}}

echo "llmtrain: job ${{SLURM_JOB_ID}} (restart ${{SLURM_RESTART_COUNT:-0}}) on ${{SLURM_JOB_NODELIST}}"

# 1. One process: data, tokenizer and run folder; on a new world size or ZeRO stage the newest
#    checkpoint is converted to a universal one (DeepSpeed ds_to_universal) before the ranks start.
"$PYTHON" -m llmtrain.cli run "$RECIPE" "${{OVERRIDES[@]}}" --out "$RUN_DIR" --resume auto --prepare-only || exit $?

# 2. One task per GPU. Each worker maps SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the first host of
#    SLURM_JOB_NODELIST to RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR itself (--slurm).
forward() {{
    echo "llmtrain: SIG$1 received; forwarding it to srun: every rank finishes its step, saves and exits"
    kill -s "$1" "$SRUN_PID" 2>/dev/null
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
srun --kill-on-bad-exit=1 --ntasks-per-node={gpus_per_node} "$PYTHON" -u -m llmtrain.train "$RUN_DIR" --resume auto --slurm &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has ended.
while true; do
    wait "$SRUN_PID"
    code=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

# 3. A clean stop before the end of the schedule (time limit, preemption): requeue; the next start resumes.
if [ "$code" -eq 0 ] && ! grep -q '^reason: complete' "$RUN_DIR/status.yaml" 2>/dev/null; then
    echo "llmtrain: saved before the end of the schedule; requeueing job $SLURM_JOB_ID (it continues with --resume auto)"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
"""
