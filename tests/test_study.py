"""llmtrain study: its command line (bad input exits 2 before anything trains) and the equal-time
step count. A real two-variant study stopped by SIGTERM in its second variant and continued by the
same command (the finished variant skipped and untouched, the stopped one resumed) is the study
example's, pasted in order: test_cli_examples.stop_then_continue."""

import json

import pytest

from conftest import llmtrain
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
