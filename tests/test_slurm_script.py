"""`llmtrain launch slurm`: the sbatch script's content, its bad input, and its behaviour under bash
with stand-ins for srun/scontrol: a signal to the batch shell reaches the tasks, an unfinished
run requeues the job, a finished or failed one does not."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtrain.launch.slurm_script import render

ROOT = Path(__file__).parent.parent
EXAMPLE_ROOT = Path("/path/to/llmtrain")


def llmtrain(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "llmtrain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    proc = llmtrain("launch", "slurm", ROOT / "recipes" / "tiny.yaml", "train.steps=5000", "--nodes", 4,
                    "--gpus-per-node", 8, "--partition", "gpu", "--time", "4:00:00", "--out", tmp_path / "run",
                    "--dry-run")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=4:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@180", "#SBATCH --open-mode=append"]:
        assert line in text.splitlines(), line
    assert "OVERRIDES=(train.steps=5000 launch.nodes=4 launch.ranks_per_node=8)" in text
    assert '--out "$RUN_DIR" --resume auto --prepare-only' in text
    srun = next(l for l in text.splitlines() if l.startswith("srun "))
    assert "--ntasks-per-node=8" in srun and "-m llmtrain.train" in srun and "--resume auto --slurm" in srun
    assert "trap 'forward USR1' USR1" in text and "trap 'forward TERM' TERM" in text
    assert 'kill -s "$1" "$SRUN_PID"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert not any(tmp_path.iterdir())


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    recipe = ROOT / "recipes" / "tiny.yaml"
    proc = llmtrain("launch", "slurm", recipe, "--nodes", 2, "--gpus-per-node", 8, "--time", "4 hours", "--dry-run")
    assert proc.returncode == 2 and "--time '4 hours'" in proc.stderr and "Traceback" not in proc.stderr
    proc = llmtrain("launch", "slurm", recipe, "train.lr=-1", "--nodes", 2, "--gpus-per-node", 8, "--dry-run")
    assert proc.returncode == 2 and "train.lr" in proc.stderr
    existing = tmp_path / "job.sbatch"
    existing.write_text("mine\n")
    proc = llmtrain("launch", "slurm", recipe, "--nodes", 2, "--gpus-per-node", 8, "--script", existing)
    assert proc.returncode == 2 and "exists" in proc.stderr and existing.read_text() == "mine\n"
    env_path = os.environ["PATH"]
    try:
        os.environ["PATH"] = str(tmp_path / "nothing")  # no sbatch on PATH
        proc = subprocess.run([sys.executable, "-m", "llmtrain.cli", "launch", "slurm", str(recipe), "--nodes", "2",
                               "--gpus-per-node", "8", "--script", str(tmp_path / "new.sbatch"), "--submit"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        os.environ["PATH"] = env_path
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr and not (tmp_path / "new.sbatch").exists()


def test_shipped_example_is_what_the_command_writes():
    text = render(recipe=EXAMPLE_ROOT / "recipes/tiny.yaml", overrides=[], run_dir=EXAMPLE_ROOT / "runs/tiny",
                  nodes=2, gpus_per_node=8, job_name="tiny", python=str(EXAMPLE_ROOT / ".venv/bin/python"),
                  time_limit="4:00:00")
    assert (ROOT / "launch" / "slurm.sbatch").read_text() == text, \
        "launch/slurm.sbatch is stale: regenerate it as launch/README.md says"


FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$LOG"
if [ "$FAKE_MODE" = complete ]; then printf 'reason: complete\\n' > "$FAKE_STATUS"; exit 0; fi
if [ "$FAKE_MODE" = fail ]; then exit 1; fi
on_signal() { echo "tasks got $1" >> "$LOG"; printf "reason: stopped by SIG$1\\n" > "$FAKE_STATUS"; exit 0; }
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
touch "$LOG.started"
while true; do sleep 0.05; done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": FAKE_SRUN, "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$LOG"\n',
                       "python": '#!/bin/bash\necho "python $*" >> "$LOG"\n'}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text(render(recipe=ROOT / "recipes/tiny.yaml", overrides=[], run_dir=run_dir, nodes=2, gpus_per_node=1,
                             job_name="tiny", python=str(bin_dir / "python")))
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "FAKE_STATUS": str(run_dir / "status.yaml"),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]"}

    def start(mode="signal"):
        return subprocess.Popen(["bash", str(script)], env={**env, "FAKE_MODE": mode}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    return start, log


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_reaches_the_tasks_and_the_job_requeues(fake_slurm, sig):
    start, log = fake_slurm
    job = start()
    deadline = time.time() + 30
    while not Path(f"{log}.started").exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(sig)
    output, _ = job.communicate(timeout=30)
    assert job.returncode == 0, output
    lines = log.read_text().splitlines()
    assert lines[0].startswith("python -m llmtrain.cli run") and lines[0].endswith("--prepare-only")
    assert lines[1].startswith("srun --kill-on-bad-exit=1") and lines[1].endswith("--resume auto --slurm")
    assert lines[2:] == [f"tasks got {sig.name[3:]}", "scontrol requeue 77"]
    assert "requeueing job 77" in output


@pytest.mark.parametrize("mode, code", [("complete", 0), ("fail", 1)])
def test_finished_or_failed_runs_do_not_requeue(fake_slurm, mode, code):
    start, log = fake_slurm
    job = start(mode)
    job.communicate(timeout=30)
    assert job.returncode == code
    assert not any(l.startswith("scontrol") for l in log.read_text().splitlines())
