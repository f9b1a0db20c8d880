"""End to end through the CLI with real DeepSpeed ranks (2 on CPU): training under ZeRO-2,
exact resume (--stop-after, SIGTERM, SIGINT, SIGUSR1 outside SLURM, the last three resumed with
activation checkpointing switched on; TempNet's dropout across the resume), pruning past
keep_last, partial checkpoints, refused resumes."""

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from llmtrain.launch.local import _is_worker

from conftest import (CHECKPOINTING, ROOT, assert_recomputed, assert_resumed_exactly, checkout_env, llmtrain,
                      metrics_lines, recompute_probe, records, stopped_copy)

pytestmark = pytest.mark.slow

# TempNet on the cce head with its dropout on: every training step draws masks from the RNG.
TEMPNET = ["head.type=cce", "temperature.enabled=true", "temperature.width=16", "temperature.dropout=0.5",
           "temperature.lr=2e-3"]


def stop_early(recipe, run: Path, sig: signal.Signals, ready, *args) -> dict:
    """`llmtrain run RECIPE --out RUN ARGS` sent `sig` as soon as `ready()`: its exit code, seconds
    from the signal to its exit, output, and the processes it started (marked through their
    environment, so orphans are found wherever they were reparented) still alive 10 s later."""
    mark = f"{run}-{sig.name}"
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain.cli", "run", str(recipe), "--out", str(run), *args],
                            cwd=ROOT, env={**checkout_env(), "LLMTRAIN_TEST_MARK": mark}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the command ended before the moment to signal it"
        time.sleep(0.02)
    proc.send_signal(sig)
    t0 = time.time()
    output, _ = proc.communicate(timeout=120)
    seconds = time.time() - t0

    def marked():
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get("LLMTRAIN_TEST_MARK") == mark and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(" ".join(p.cmdline())[:200])
        return found

    deadline = time.time() + 10
    while marked() and time.time() < deadline:
        time.sleep(0.2)
    return {"code": proc.returncode, "seconds": seconds, "output": output, "left": marked()}


@pytest.fixture(scope="module")
def stopped_early(recipe, tmp_path_factory):
    """The straight run's command, stopped three times before its ranks could train: by SIGTERM
    while its data was being tokenized (into a cache of its own, so that it is always still to do),
    then, run again as it was, by SIGINT while the launcher was starting the ranks, then, with
    --resume auto, by SIGUSR1 once the rank processes existed (still importing, no handler yet)."""
    run, cache = tmp_path_factory.mktemp("straight") / "z2", tmp_path_factory.mktemp("cache")
    tokenizing = lambda: any((cache / "tokens").glob("*.partial"))  # noqa: E731
    prep = stop_early(recipe, run, signal.SIGTERM, tokenizing, f"data.cache_dir={cache}")
    prep["cache"] = sorted(p.name.endswith(".partial") for p in (cache / "tokens").iterdir())
    prep["folder"] = sorted(p.name for p in run.iterdir())
    launching = lambda: (run / "status.yaml").is_file()  # noqa: E731  written just before the launcher starts
    launch = stop_early(recipe, run, signal.SIGINT, launching, f"data.cache_dir={cache}")
    launch["state"] = yaml.safe_load((run / "status.yaml").read_text())["state"]
    # The rank processes exist but are still importing: without their handlers, a signal kills them.
    starting = stop_early(recipe, run, signal.SIGUSR1, lambda: ranks_exist(f"{run}-SIGUSR1"), "--resume", "auto",
                          f"data.cache_dir={cache}")
    starting["state"] = yaml.safe_load((run / "status.yaml").read_text())["state"]
    return run, cache, prep, launch, starting


def ranks_exist(mark: str) -> bool:
    """A rank process (`-m llmtrain.train`) of the command marked `mark` (stop_early) is running."""
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if _is_worker(p.cmdline()) and p.environ().get("LLMTRAIN_TEST_MARK") == mark:
                return True
    return False


@pytest.fixture(scope="module")
def straight(recipe, stopped_early):
    """The uninterrupted 8-step ZeRO-2 run (evaluations and checkpoints at steps 4 and 8): what
    every resume of this recipe must reproduce. Its folder and data cache are the early-stopped
    command's, continued with --resume auto as that command said."""
    run, cache, *_ = stopped_early
    llmtrain("run", recipe, "--out", run, "--resume", "auto", f"data.cache_dir={cache}")
    return run


def test_a_signal_before_the_ranks_exist_ends_the_command_and_leaves_it_resumable(stopped_early, straight):
    _, _, prep, launch, starting = stopped_early
    for outcome, sig in ((prep, signal.SIGTERM), (launch, signal.SIGINT), (starting, signal.SIGUSR1)):
        assert outcome["code"] == 128 + sig, outcome["output"][-3000:]
        assert f"stopped by {sig.name} before the ranks started" in outcome["output"] or \
            f"{sig.name} while the ranks were starting" in outcome["output"], outcome["output"][-3000:]
        assert "Traceback" not in outcome["output"] and "--resume auto" in outcome["output"]
        assert outcome["seconds"] < 30, outcome  # the tokenizing pool and a starting launcher end within seconds
        assert not outcome["left"], f"left running after {sig.name}: {outcome['left']}"
    assert prep["cache"] == [True], "the first command was not stopped while tokenizing"
    assert prep["folder"] == [".llmtrain.lock"]  # nothing of a run written yet, so nothing half-written
    assert launch["state"] == starting["state"] == "interrupted"
    assert "while the ranks were starting" in starting["output"]  # the ranks existed: not before the launcher
    assert not (straight / "checkpoints" / "step00000002").exists()
    assert yaml.safe_load((straight / "status.yaml").read_text())["state"] == "complete"


def assert_trained(run: Path, stage: int):
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        assert {"step", "loss", "lr", "tokens_seen", "train_s", "tokens_per_s", "peak_mem_bytes"} <= r.keys()
    train_s = [r["train_s"] for r in recs]
    assert 0 < train_s[0] and all(a < b for a, b in zip(train_s, train_s[1:]))
    assert recs[-1]["tokens_seen"] == 8 * 2 * 2 * 32
    assert recs[-1]["loss"] < recs[0]["loss"]
    evals = records(run, "val_loss")
    assert [e["step"] for e in evals] == [4, 8]
    for e in evals:
        assert e["val_ppl"] == pytest.approx(2.718281828 ** e["val_loss"], rel=1e-6)
        assert 0 < e["val_bpb"] < e["val_loss"] and 0 <= e["val_top1"] <= e["val_top5"] <= e["val_top10"] <= 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step00000004", "step00000008"]
    assert yaml.safe_load((run / "recipe.resolved.yaml").read_text())["deepspeed"]["zero_stage"] == stage


# ZeRO-3 training, checkpointing and evaluation: test_matrix_e2e's zero3 cell (trained, checkpointed
# and evaluated every 2 steps, resumed exactly, its val_loss recomputed from the export) and
# test_clusters_e2e's ZeRO-3 run (the ZeRO-2 trajectory and final val_loss to 1e-6).
def test_zero2_trains_checkpoints_and_evaluates(straight):
    assert_trained(straight, 2)


def test_tempnet_stop_after_then_resume_auto_continues_exactly(recipe, tmp_path):
    """TempNet's dropout (0.5) draws from every rank's RNG each step: the resumed run's losses and
    τ equal the uninterrupted run's only if the saved RNG streams are restored. Then the run
    exports with its network and generates at its predicted temperatures."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    llmtrain("run", recipe, "--out", straight, *TEMPNET)
    # A checkpoint at every step, keep_last=2: only the newest two remain, and the resume below loads
    # the newest (it is whole: verified, then resumed exactly).
    first = llmtrain("run", recipe, "--out", split, "--stop-after", 3, "checkpoint.every=1", "checkpoint.keep_last=2",
                     *TEMPNET)
    assert "--resume auto" in first.stdout + first.stderr
    assert sorted(p.name for p in (split / "checkpoints").iterdir() if p.is_dir()) == ["step00000002", "step00000003"]
    llmtrain("checkpoint", "verify", split)
    segment = metrics_lines(split)
    # A half-written newer checkpoint (no llmtrain.json) must be ignored by --resume auto.
    partial = split / "checkpoints" / "step00000007"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    resumed = llmtrain("run", recipe, "--out", split, "--resume", "auto", *TEMPNET)
    assert assert_resumed_exactly(split, straight, segment, resumed.stderr) == 3
    assert {"tau_mean", "lr_temperature"} <= records(split)[-1].keys()
    train_s = [r["train_s"] for r in records(split)]  # carried over the resume, not restarted
    assert all(a < b for a, b in zip(train_s, train_s[1:]))
    # the network is part of the trained model: exported with it, and sampling at its τ
    from llmtrain.export import load_exported

    llmtrain("export", split, "--out", tmp_path / "export")
    assert load_exported(tmp_path / "export").head.temperature is not None
    auto = llmtrain("generate", split, "--prompt", "def main(", "--temperature", "auto", "--max-new-tokens", 4)
    assert auto.stdout.startswith("def main(") and len(auto.stdout) > len("def main(\n")


def stop_when_past(recipe, run: Path, step: int, sig: signal.Signals, *args, env=None) -> str:
    """`llmtrain run RECIPE --out RUN ARGS` sent `sig` as soon as it has logged a step after `step`;
    it must exit 0 (the ranks finish their step, save and exit). Returns its output."""
    proc = subprocess.Popen([sys.executable, "-m", "llmtrain.cli", "run", str(recipe), "--out", str(run), *args],
                            cwd=ROOT, env={**checkout_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and \
            not any(json.loads(line)["step"] > step for line in metrics_lines(run)):
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    return output


# Two stops in one run of 8 steps leave room for the second signal to land before the end (each
# lands a step or two after it is sent); SIGUSR1 stops a run of its own.
@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGINT), (signal.SIGUSR1,)], ids=["TERM-INT", "USR1"])
def test_stop_signals_save_then_resume_auto_continues_exactly(recipe, straight, tmp_path, signals):
    """A run stopped by each of `signals` in turn: SIGTERM, SIGINT, and SIGUSR1 (what SLURM sends
    before a job's time limit, --signal=USR1@...; outside SLURM it means the same: stop and save,
    resumable), each sent to the CLI as soon as a step after the last stop is logged. Each time
    the ranks finish their step, save and exit 0; each resume (with activation checkpointing
    switched on: same losses, every block recomputed) loads the step the last stop saved, keeps
    the records before it, and the last one reproduces the uninterrupted run at ZeRO-2."""
    run, stopped, segments = tmp_path / "sig", 0, []
    for i, sig in enumerate(signals):
        probe = tmp_path / f"probe{i}"
        resume = ["--resume", "auto", CHECKPOINTING] if i else []
        output = stop_when_past(recipe, run, stopped, sig, *resume, env=recompute_probe(probe) if i else None)
        assert f"stopped by {sig.name}" in output and "--resume auto" in output
        if i:
            assert f"(step {stopped}, " in [line for line in output.splitlines() if "resuming from" in line][-1]
        now = yaml.safe_load((run / "status.yaml").read_text())["step"]
        assert stopped < now < 8, f"{sig.name} came too late to stop the run before its end (step {now})"
        if i:
            assert_recomputed(run, probe, now - stopped)
        stopped = now
        segments.append([line for line in metrics_lines(run) if json.loads(line)["step"] <= stopped])
    probe = tmp_path / "probe"
    resumed = llmtrain("run", recipe, "--out", run, "--resume", "auto", CHECKPOINTING, env=recompute_probe(probe))
    assert assert_resumed_exactly(run, straight, segments[-1], resumed.stderr) == stopped
    for segment in segments:  # no resume rewrote what an earlier segment logged
        assert metrics_lines(run)[:len(segment)] == segment
    assert_recomputed(run, probe, 8 - stopped)


def test_resume_refuses_a_different_model(recipe, straight, tmp_path):
    run = tmp_path / "base"
    stopped_copy(straight, run, 4)
    proc = llmtrain("run", recipe, "--out", run, "--resume", "auto", "model.layers=3", check=False)
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "layers=2 where the recipe has 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_input_exits_2_and_starts_nothing(recipe, tmp_path):
    run = tmp_path / "never"
    proc = llmtrain("run", recipe, "--out", run, "train.precision=fp16", "deepspeed.zero_stage=5", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.precision" in proc.stderr and "deepspeed.zero_stage" in proc.stderr
    assert not run.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("{}\n")
    proc = llmtrain("run", recipe, "--out", existing, check=False)
    assert proc.returncode == 2 and "holds an earlier run" in proc.stderr
    assert (existing / "metrics.jsonl").read_text() == "{}\n"
