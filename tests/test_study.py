"""llmtrain study: its command line (bad input exits 2 before anything trains), the equal-time step
count, and a real two-variant study stopped by SIGTERM in its second variant and continued by the
same command (the finished variant skipped and untouched, the stopped one resumed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, checkout_env, llmtrain, records
from llmtrain.errors import UserError
from llmtrain.report.study import equal_time_steps, parse_study_args


def test_arguments_split_into_common_and_per_variant_overrides():
    common, variants = parse_study_args(["train.steps=9", "--variant", "a", "head.type=cce", "--variant", "b"])
    assert common == ["train.steps=9"]
    assert [(v.name, v.overrides) for v in variants] == [("a", ["head.type=cce"]), ("b", [])]
    for bad, words in ((["--variant", "head.type=cce"], "NAME"), (["--variant", "a/b"], "folder"),
                       (["--variant", "a", "--variant", "a"], "twice"), (["--variant", "a", "oops"], "KEY=VALUE"),
                       (["--variant", "a", "--bogus"], "unknown option"), (["train.steps=3"], "no --variant"),
                       (["--variant", "report"], "report")):
        with pytest.raises(UserError, match=words):
            parse_study_args(bad)


def test_equal_time_steps_scale_by_training_seconds(tmp_path):
    for name, last in (("ref", {"step": 100, "train_s": 50.0}), ("fast", {"step": 100, "train_s": 20.0})):
        (tmp_path / name).mkdir()
        lines = [{"step": 50, "loss": 1.0, "train_s": last["train_s"] / 2}, {**last, "loss": 1.0}, {**last, "val_top1": 0.1}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert equal_time_steps(tmp_path / "ref", tmp_path / "fast") == 250
    assert equal_time_steps(tmp_path / "fast", tmp_path / "ref") == 40


def test_bad_input_exits_2_and_trains_nothing(recipe, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    for args, words in ((["--variant", "a", "head.type=nope", "--out", tmp_path / "s"], "--variant a: "),
                        (["--variant", "a", "--out", tmp_path / "other"], "no study.yaml"),
                        (["--out", tmp_path / "s"], "no --variant")):
        proc = llmtrain("study", recipe, *args, check=False)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_stopped_study_continues_where_it_stopped(recipe, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "llmtrain.cli", "study", str(recipe), "--variant", "softmax", "head.type=softmax",
           "--variant", "hsm", "head.type=hsm", "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "hsm" / "metrics.jsonl").is_file():  # the second variant has trained a step
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output[-3000:]
    assert "study: hsm stopped; run the same command to continue" in output
    assert "report" not in os.listdir(out)
    finished = (out / "softmax" / "metrics.jsonl").stat()
    stopped_at = records(out / "hsm")[-1]["step"]
    assert stopped_at < 8

    again = llmtrain(*cmd[3:])
    assert "study: softmax is complete, skipped" in again.stderr
    assert f"resuming from {out / 'hsm' / 'checkpoints'}" in again.stderr
    assert (out / "softmax" / "metrics.jsonl").stat().st_mtime_ns == finished.st_mtime_ns  # untouched
    for name in ("softmax", "hsm"):
        steps = [r["step"] for r in records(out / name)]
        assert steps == list(range(1, 9)), (name, steps)  # each step once, the resumed ones after the stop
        assert all(0 < r["mfu"] < 1 for r in records(out / name))
    table = (out / "report" / "table.md").read_text()
    final = records(out / "hsm", "val_loss")[-1]
    assert "| hsm | hsm | complete | 8/8 |" in table and f"| {final['val_loss']:.4f} |" in table
    assert len(list((out / "report").glob("*.png"))) == 5
