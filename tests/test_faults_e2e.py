"""The fault battery: faults injected through the real CLI into 2 real DeepSpeed ranks (gloo, CPU).
Each scenario checks the exit code, a bound on the time to exit, status.yaml, and that the newest
intact checkpoint survives and resumes onto the uninterrupted run's losses (bit for bit on CPU).

Timings are printed as `FAULT scenario | exit | seconds | kept` lines (pytest -s) for RELIABILITY.md."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import ROOT, by_step, checkout_env, llmtrain, records
from llmtrain.train.checkpoint import META, complete_checkpoints, tag_for, verify

pytestmark = pytest.mark.slow

EVERY = "checkpoint.every=2"
KEEP = "checkpoint.keep_last=4"
STALL_S = 25


def report(scenario, code, seconds, kept):
    print(f"\nFAULT {scenario} | {code} | {seconds:.1f} | {kept}")


@pytest.fixture(scope="module")
def straight(recipe, tmp_path_factory):
    """The uninterrupted 8-step run with a checkpoint every 2 steps: the reference trajectory and
    a source of run folders to damage."""
    run = tmp_path_factory.mktemp("straight") / "run"
    llmtrain("run", recipe, "--out", run, EVERY, KEEP)
    return run


def copy_until(straight, tmp_path, step) -> Path:
    """A copy of the straight run as if it had stopped after `step` (later checkpoints removed)."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for d in complete_checkpoints(run / "checkpoints"):
        if int(d.name[4:]) > step:
            shutil.rmtree(d)
    return run


def status(run) -> dict:
    return yaml.safe_load((run / "status.yaml").read_text())


def start(*args, log: Path) -> subprocess.Popen:
    """`llmtrain ARGS` in the background, output to `log` (no pipe to fill)."""
    return subprocess.Popen([sys.executable, "-m", "llmtrain.cli", *map(str, args)], cwd=ROOT, env=checkout_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def training(run: Path, since: float, after_step: int):
    """A condition: this attempt (not the copied run) has logged a step past `after_step`."""
    return lambda: any(r["step"] > after_step and r["time"] > since for r in records(run))


def wait_for(condition, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def rank_process(cli: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(cli.pid).children(recursive=True):
        try:
            if "llmtrain.train" in child.cmdline() and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def weights_finite(tag_dir: Path) -> bool:
    for f in tag_dir.glob("*model_states.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)["module"]
        if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
            return False
    return True


def resumes_exactly(run, recipe, straight):
    """Resume `run` with --resume auto to step 8: its losses equal the straight run's."""
    llmtrain("run", recipe, "--out", run, "--resume", "auto", EVERY, KEEP)
    assert by_step(run) == by_step(straight)


def test_divergence_stops_saves_nothing_broken_and_keeps_the_last_good_checkpoint(recipe, straight, tmp_path):
    """A resumed run (its folder holds the finished run's status.yaml) diverges: exit 3, not 0.
    lr=1e6 leaves huge but finite weights after step 5 (saved: nothing can tell yet); step 6's
    gradients overflow. keep_last=1 must not have pruned step 4, the last checkpoint confirmed by a
    finite step after it."""
    run = copy_until(straight, tmp_path, 4)
    t0 = time.time()
    proc = llmtrain("run", recipe, "--out", run, "--resume", "auto", "train.lr=1e6",
                    "checkpoint.every=1", "checkpoint.keep_last=1", check=False)
    seconds = time.time() - t0
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "diverged at step 6" in proc.stderr and "Traceback" not in proc.stderr
    good = run / "checkpoints" / tag_for(4)
    assert f"last good checkpoint: {good}" in proc.stderr and f"{tag_for(5)}, saved after it" in proc.stderr
    assert status(run)["state"] == "diverged" and status(run)["checkpoint"] == str(good)
    kept = complete_checkpoints(run / "checkpoints")
    assert [d.name for d in kept] == [tag_for(2), tag_for(4), tag_for(5)]  # nothing from step 6 on, nothing pruned
    assert all(weights_finite(d) for d in kept) and verify(good) is None
    report("train.lr=1e6 from step 5, ZeRO-2, on_nonfinite=stop, keep_last=1 (resumed run)", 3, seconds,
           f"{tag_for(4)} (last good), {tag_for(5)}")
    llmtrain("run", recipe, "--out", run, "--resume", good, EVERY, KEEP)
    assert by_step(run) == by_step(straight)


def test_skip_mode_skips_overflowing_steps_then_stops_after_max_skipped(recipe, straight, tmp_path):
    run = copy_until(straight, tmp_path, 4)
    t0 = time.time()
    proc = llmtrain("run", recipe, "--out", run, "--resume", "auto", "train.lr=1e6", "train.on_nonfinite=skip",
                    "train.max_skipped=2", "checkpoint.every=1", "checkpoint.keep_last=1", check=False)
    seconds = time.time() - t0
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 steps in a row skipped" in proc.stderr
    skipped = [r["step"] for r in records(run) if r.get("skipped")]
    assert skipped and len(skipped) <= 2
    kept = complete_checkpoints(run / "checkpoints")
    assert kept and all(weights_finite(d) for d in kept)
    assert status(run)["checkpoint"] == str(run / "checkpoints" / tag_for(4))
    report("train.lr=1e6 from step 5, ZeRO-2, on_nonfinite=skip, max_skipped=2", 3, seconds,
           f"{tag_for(4)} (last good) and later finite ones")


def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(recipe, straight, tmp_path):
    run = copy_until(straight, tmp_path, 4)
    log = tmp_path / "log"
    since = time.time()
    # 25 s: above a loaded machine's worker start-up and checkpoint load (the watchdog counts them),
    # short enough not to spend a minute waiting on the timeout it tests
    cli = start("run", recipe, "--out", run, "--resume", "auto", "train.steps=400", f"launch.timeout_s={STALL_S}",
                "checkpoint.every=1000", log=log)
    try:
        wait_for(training(run, since, 4), what="a step after the resume")
        assert status(run)["state"] == "running" and status(run)["pid"] == cli.pid  # this attempt's status
        victim = rank_process(cli, 1)
        victim.send_signal(signal.SIGSTOP)
        t0 = time.time()
        code = cli.wait(timeout=120)
        seconds = time.time() - t0
    finally:
        cli.kill()
    output = log.read_text()
    assert code == 124, output[-3000:]
    assert seconds < STALL_S + 15  # launch.timeout_s, plus the watchdog's poll and the kill, on a loaded machine
    assert f"rank 1 (PID {victim.pid}) is stopped" in output
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert status(run)["state"] == "hung"
    kept = complete_checkpoints(run / "checkpoints")
    assert kept[-1].name == tag_for(4) and verify(kept[-1]) is None
    report(f"SIGSTOP rank 1, launch.timeout_s={STALL_S}", code, seconds, kept[-1].name)
    resumes_exactly(run, recipe, straight)


def test_a_rank_killed_during_zero3_model_construction_does_not_hang_the_other(recipe, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    cli = start("run", recipe, "--out", run, "deepspeed.zero_stage=3", "launch.timeout_s=60", log=log)
    try:
        wait_for(lambda: (run / ".heartbeat" / "rank1").exists(), what="rank 1 to join")  # right after init_distributed
        victim = rank_process(cli, 1)
        victim.kill()
        t0 = time.time()
        code = cli.wait(timeout=120)
        seconds = time.time() - t0
    finally:
        cli.kill()
    output = log.read_text()
    assert code == 1, output[-3000:]
    assert seconds < 20  # the watchdog ends the survivor 5 s after a rank is gone
    assert f"rank 1 (PID {victim.pid}) died (killed, or crashed without a word) first" in output
    assert status(run)["state"] == "failed"
    report("SIGKILL rank 1 during ZeRO-3 model construction", code, seconds, "nothing (no checkpoint yet)")


def test_second_sigterm_stops_at_once_and_a_second_run_on_the_folder_is_refused(recipe, straight, tmp_path):
    run = copy_until(straight, tmp_path, 4)
    log = tmp_path / "log"
    since = time.time()
    cli = start("run", recipe, "--out", run, "--resume", "auto", "train.steps=400", "checkpoint.every=3", log=log)
    try:
        wait_for(training(run, since, 6), what="steps after the resume")
        second = llmtrain("run", recipe, "--out", run, "--resume", "auto", check=False)
        assert second.returncode == 2 and f"PID {cli.pid}" in second.stderr
        cli.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        cli.send_signal(signal.SIGTERM)
        t0 = time.time()
        code = cli.wait(timeout=60)
        seconds = time.time() - t0
    finally:
        cli.kill()
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert seconds < 3
    assert status(run)["state"] == "interrupted"
    kept = complete_checkpoints(run / "checkpoints")
    assert all(verify(d) is None for d in kept)
    assert not [d for d in (run / "checkpoints").iterdir() if d.name.startswith("step") and not (d / META).exists()]
    report("SIGTERM twice (0.3 s apart)", code, seconds, kept[-1].name)


def test_corrupt_newest_checkpoints_and_a_torn_metrics_line_fall_back_and_resume(recipe, straight, tmp_path):
    run = copy_until(straight, tmp_path, 6)
    (run / "checkpoints" / tag_for(6) / META).write_text("")  # an unreadable marker
    optim = next((run / "checkpoints" / tag_for(4)).glob("zero_pp_rank_1_*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in rank 1's optimizer state
    optim.write_bytes(bytes(data))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.')
    check = llmtrain("checkpoint", "verify", run, check=False)
    assert check.returncode == 1 and str(optim) in check.stdout and str(run / "checkpoints" / tag_for(6) / META) in check.stdout
    t0 = time.time()
    proc = llmtrain("run", recipe, "--out", run, "--resume", "auto", EVERY, KEEP)
    seconds = time.time() - t0
    assert str(optim) in proc.stderr and "resuming from" in proc.stderr and "(step 2," in proc.stderr
    assert "torn last line" in proc.stderr
    assert by_step(run) == by_step(straight)
    assert llmtrain("checkpoint", "verify", run).returncode == 0
    report("bit flip in step 4's optimizer file, empty marker in step 6, torn metrics line", 0, seconds,
           "resumed from step 2, losses exact")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1700k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_disk_full_names_the_path_removes_the_partial_save_and_keeps_the_older(recipe, straight, tmp_path, small_disk):
    run = small_disk / "run"
    t0 = time.time()
    proc = llmtrain("run", recipe, "--out", run, EVERY, KEEP, check=False)
    seconds = time.time() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "no space left on device" in proc.stderr and str(run / "checkpoints") in proc.stderr
    assert "warning: checkpoint" in proc.stderr and "needs about" in proc.stderr  # said before the save began
    kept = complete_checkpoints(run / "checkpoints")
    assert kept and all(verify(d) is None for d in kept)
    assert sorted(d.name for d in (run / "checkpoints").iterdir() if d.name.startswith("step")) == [d.name for d in kept]
    assert status(run)["state"] == "failed"
    report("disk full (1.7 MB tmpfs, 1.1 MB checkpoints) at the second save", proc.returncode, seconds, kept[-1].name)
    big = tmp_path / "big"
    shutil.copytree(run, big, ignore=shutil.ignore_patterns(".llmtrain.lock"))
    resumes_exactly(big, recipe, straight)


def test_resuming_on_another_corpus_is_refused_naming_it_unless_allowed(recipe, straight, tmp_path):
    run = copy_until(straight, tmp_path, 4)
    proc = llmtrain("run", recipe, "--out", run, "--resume", "auto", "data.max_bytes=150000", check=False)
    assert proc.returncode == 2 and "another corpus" in proc.stderr and "data.source" in proc.stderr
    assert "--allow-data-change" in proc.stderr and "Traceback" not in proc.stderr
    llmtrain("run", recipe, "--out", run, "--resume", "auto", "data.max_bytes=150000", "--allow-data-change",
             "--stop-after", 1)
    assert max(by_step(run)) == 5


def test_a_recipe_that_cannot_fit_is_refused_before_launch_unless_forced(recipe, tmp_path):
    run = tmp_path / "run"
    proc = llmtrain("run", recipe, "--out", run, "train.micro_batch=1000000", check=False)
    assert proc.returncode == 2 and "estimated memory per rank" in proc.stderr and "What would fit" in proc.stderr
    assert "--force" in proc.stderr and not run.exists()
    forced = llmtrain("run", recipe, "--out", run, "train.micro_batch=1000000", "--force", "--prepare-only")
    assert "prepared" in forced.stderr
