"""End to end through the CLI with real DeepSpeed ranks (2 on CPU): training under ZeRO-2/3,
exact resume (--stop-after, SIGTERM, SIGINT; TempNet's dropout across the resume), partial
checkpoints, refused resumes."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_resumed_exactly, checkout_env, llmtrain, metrics_lines, records

pytestmark = pytest.mark.slow

# TempNet on the cce head with its dropout on: every training step draws masks from the RNG.
TEMPNET = ["head.type=cce", "temperature.enabled=true", "temperature.width=16", "temperature.dropout=0.5",
           "temperature.lr=2e-3"]


@pytest.fixture(scope="module")
def straight(recipe, tmp_path_factory):
    """The uninterrupted 8-step ZeRO-2 run (evaluations and checkpoints at steps 4 and 8): what
    every resume of this recipe must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "z2"
    llmtrain("run", recipe, "--out", run)
    return run


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


def test_zero2_trains_checkpoints_and_evaluates(straight):
    assert_trained(straight, 2)


def test_zero3_trains_checkpoints_and_evaluates(recipe, tmp_path):
    run = tmp_path / "z3"
    llmtrain("run", recipe, "deepspeed.zero_stage=3", "--out", run)
    assert_trained(run, 3)


def test_tempnet_stop_after_then_resume_auto_continues_exactly(recipe, tmp_path):
    """TempNet's dropout (0.5) draws from every rank's RNG each step: the resumed run's losses and
    τ equal the uninterrupted run's only if the saved RNG streams are restored. Then the run
    exports with its network and generates at its predicted temperatures."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    llmtrain("run", recipe, "--out", straight, *TEMPNET)
    first = llmtrain("run", recipe, "--out", split, "--stop-after", 3, *TEMPNET)
    assert "--resume auto" in first.stdout + first.stderr
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_then_resume_auto_continues_exactly(recipe, straight, tmp_path, sig):
    """The signal reaches the CLI as soon as step 1 is logged; the ranks finish their step, save
    and exit 0, and the resume reproduces the uninterrupted run."""
    run = tmp_path / "sig"
    cmd = [sys.executable, "-m", "llmtrain.cli", "run", str(recipe), "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not metrics_lines(run):
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert f"stopped by {sig.name}" in output and "--resume auto" in output
    stopped = yaml.safe_load((run / "status.yaml").read_text())["step"]
    assert 0 < stopped < 8, "the signal came too late to stop the run before its end"
    segment = metrics_lines(run)
    resumed = llmtrain("run", recipe, "--out", run, "--resume", "auto")
    assert assert_resumed_exactly(run, straight, segment, resumed.stderr) == stopped


def test_resume_refuses_a_different_model(recipe, tmp_path):
    run = tmp_path / "base"
    llmtrain("run", recipe, "--out", run, "--stop-after", 1)
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
