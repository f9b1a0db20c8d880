"""End to end through the CLI with real DeepSpeed ranks (2 on CPU): training under ZeRO-2/3,
exact resume, stop signals, partial checkpoints, refused resumes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, llmtrain, records

pytestmark = pytest.mark.slow


def losses(run: Path):
    return {r["step"]: r["loss"] for r in records(run)}


@pytest.mark.parametrize("stage", [2, 3])
def test_trains_checkpoints_and_evaluates(recipe, tmp_path, stage):
    run = tmp_path / f"z{stage}"
    llmtrain("run", recipe, f"deepspeed.zero_stage={stage}", "--out", run)
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


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(recipe, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    llmtrain("run", recipe, "--out", straight, "checkpoint.every=100")
    first = llmtrain("run", recipe, "--out", split, "--stop-after", 3, "checkpoint.every=100")
    assert "--resume auto" in first.stdout + first.stderr
    # A half-written newer checkpoint (no llmtrain.json) must be ignored by --resume auto.
    partial = split / "checkpoints" / "step00000007"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    llmtrain("run", recipe, "--out", split, "--resume", "auto", "checkpoint.every=100")
    assert losses(split) == losses(straight)  # exact float equality, every step 1..8
    train_s = [r["train_s"] for r in records(split)]  # carried over the resume, not restarted
    assert all(a < b for a, b in zip(train_s, train_s[1:]))


def test_sigterm_saves_then_resume_finishes(recipe, tmp_path):
    run = tmp_path / "sig"
    cmd = [sys.executable, "-m", "llmtrain.cli", "run", str(recipe), "--out", str(run), "train.steps=400",
           "checkpoint.every=1000", "eval.every=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and records(run)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output and "--resume auto" in output
    saved = json.loads(next((run / "checkpoints").glob("*/llmtrain.json")).read_text())
    assert 0 < saved["step"] < 400
    llmtrain("run", recipe, "--out", run, "--resume", "auto", f"train.steps={saved['step'] + 2}")
    assert max(losses(run)) == saved["step"] + 2


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
