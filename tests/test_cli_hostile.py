"""Hostile input through every command: brackets, quotes, newlines, undecodable bytes, huge numbers,
booleans where numbers go. Each is a user mistake: exit code 2, a one-line `error:` message naming
the key, flag or file, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ROOT, checkout_env
from llmtrain.cli import app

TINY = str(ROOT / "recipes" / "tiny.yaml")
BAD_BYTES = os.fsdecode(b"bad\xff\xfename")  # how Python hands undecodable argv bytes to the program

# (command line, words the message must hold: the key, flag or file)
HOSTILE = [
    (["compare", "no[/]such/run"], ["no[/]such/run", "no such folder"]),
    (["compare", BAD_BYTES], ["bad\\udcff\\udcfename", "no such folder"]),
    (["study", TINY, "--variant", "a\nb", "head.type=cce", "--out", "s"], ["--variant", "folder under --out"]),
    (["study", TINY, "--variant", "a", "train.steps=1e999", "--out", "s"], ["--variant a", "train.steps"]),
    (["recipe", "check", TINY, "train.betas=[0.9, 0.95"], ["train.betas", "not valid YAML"]),
    (["recipe", "check", TINY, "head.type='cce"], ["head.type", "not valid YAML"]),
    (["recipe", "check", TINY, 'data.source="unclosed'], ["data.source", "not valid YAML"]),
    (["recipe", "check", TINY, "data.source=*.jsonl"], ["data.source", "*.jsonl"]),
    (["recipe", "check", TINY, "data.source=no[/]such/dir"], ["data.source", "no[/]such/dir"]),
    (["recipe", "check", TINY, "train.steps=true"], ["train.steps", "not true"]),
    (["recipe", "check", TINY, "deepspeed.zero_stage=false"], ["deepspeed.zero_stage", "not false"]),
    (["recipe", "check", TINY, "head.type=cce", "head.z_loss=true"], ["head.z_loss", "not true"]),
    (["recipe", "check", TINY, "train.lr=1e999"], ["train.lr", "finite"]),
    (["recipe", "check", TINY, "train.steps=99999999999999999999999"], ["train.steps", "too large"]),
    (["recipe", "check", TINY, "train.steps=" + "9" * 5000], ["train.steps"]),
    (["recipe", "check", TINY, "model.layers=1e30"], ["model.layers"]),
    (["recipe", "check", TINY, "train.st\neps=1"], ["train.st\\neps", "did you mean 'steps'"]),
    (["recipe", "check", TINY, "train.steps=1\n2: 3"], ["train.steps"]),
    (["recipe", "check", TINY, "head=[vocab, d_model]"], ["head", "a section of keys"]),
    (["recipe", "check", TINY, f"data.source={BAD_BYTES}"], ["data.source", "\\udcff"]),
    (["recipe", "check", "weird[/]dir/[bold]x:smile:.yaml"], ["weird[/]dir/[bold]x:smile:.yaml"]),
    (["recipe", "check", BAD_BYTES + ".yaml"], ["bad\\udcff\\udcfename.yaml"]),
    (["recipe", "check", "x" * 5000 + ".yaml"], ["recipe file not found"]),
    (["recipe", "keys", "trian"], ["'trian'", "did you mean 'train'"]),
    (["recipe", "copy", "tinny", "out.yaml"], ["'tinny'", "did you mean 'tiny'"]),
    (["run", TINY, "train.betas=[0.9", "--out", "OUT"], ["train.betas"]),
    (["run", TINY, "head.filter_eps=true", "head.type=cce", "--out", "OUT"], ["head.filter_eps"]),
    (["profile", TINY, "train.betas=[0.9", "--no-measure"], ["train.betas"]),
    (["profile", "--preset", "llama3-8b", "--budget", "80", "--no-measure"], ["--budget", "unit"]),
    (["profile", "--preset", "llama3-8b", "--budget", "true", "--no-measure"], ["--budget"]),
    (["profile", "--preset", "llama3-8b", "--budget", "1e400GB", "--no-measure"], ["--budget"]),
    (["profile", "--preset", "llama3-8b", "--heads", "cce:chunk_sise=5", "--no-measure"], ["--heads", "chunk_size"]),
    (["profile", "--preset", "llama3-8b", "--heads", "cce:chunk_size=[1", "--no-measure"], ["--heads", "chunk_size"]),
    (["profile", "--preset", "llama3-8b", "--heads", "sofmax", "--no-measure"], ["--heads", "did you mean 'softmax'"]),
    (["profile", "--preset", "llama4", "--no-measure"], ["--preset", "llama3-8b"]),
    (["profile", "--tokens", "8", "--vocab", "10", "--hidden", "true", "--no-measure"], ["--hidden"]),
    (["launch", "slurm", TINY, "launch.ranks_per_node=2", "--gpus-per-node", "8", "--dry-run"],
     ["--gpus-per-node", "launch.ranks_per_node"]),
    (["launch", "slurm", TINY, "launch.nodes=2", "--nodes", "3", "--dry-run"], ["--nodes", "launch.nodes"]),
    (["launch", "slurm", TINY, "--time", "4:00:00\nrm -rf /", "--dry-run"], ["--time"]),
    (["launch", "slurm", TINY, "--account", "a b", "--dry-run"], ["--account"]),
    (["launch", "slurm", TINY, "--qos", "high\n#SBATCH --nodes=9", "--dry-run"], ["--qos"]),
    (["launch", "slurm", TINY, "--constraint", "a100\nsrun", "--dry-run"], ["--constraint"]),
    (["launch", "slurm", TINY, "--sbatch-line", "--nodes=9", "--dry-run"], ["--sbatch-line", "--nodes"]),
    (["launch", "slurm", TINY, "--sbatch-line", "mail me", "--dry-run"], ["--sbatch-line"]),
    (["launch", "slurm", TINY, "train.steps=[1", "--dry-run"], ["train.steps"]),
    (["generate", "no[/]run", "--prompt", "'\"[bold]"], ["no[/]run"]),
    (["generate", BAD_BYTES, "--prompt", "x"], ["\\udcff"]),
    (["generate", "nowhere", "--prompt", "x", "--top-p", "0"], ["--top-p"]),
    (["generate", "nowhere", "--prompt", "x", "--temperature", "hot"], ["--temperature"]),
    (["export", "no[/]run", "--out", "OUT"], ["no[/]run"]),
    (["checkpoint", "universal", "no[/]run"], ["no[/]run"]),
    (["bench", "heads", "--heads", "cce:chunk_size=true"], ["--heads", "head.chunk_size"]),
    (["bench", "heads", "--heads", "cec"], ["--heads", "did you mean 'cce'"]),
    (["bench", "heads", "--dtype", "fp16"], ["--dtype", "fp32"]),
    (["bench", "heads", "--peers", "torch-eagre"], ["--peers", "torch-eagre"]),
]


@pytest.mark.parametrize("args, words", HOSTILE, ids=lambda v: repr(v)[:60] if isinstance(v, list) else "")
def test_hostile_input_is_a_one_line_error_with_exit_2(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}\n{result.output}"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    problem = result.stderr.strip()
    assert problem.startswith(("error: ", "Usage: ")), problem
    if problem.startswith("error: "):
        assert len(problem.splitlines()) == 1, problem
    for word in words:
        assert word in problem, problem
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing written


def test_a_recipe_that_is_not_yaml_or_not_utf8_is_named(tmp_path):
    broken = tmp_path / "broken[1].yaml"
    broken.write_text("model:\n  layers: [1, 2\ntrain: {}\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model:\n  layers: 2\n\xff\xfe\x00")
    for path, words in ((broken, ["broken[1].yaml", "not valid YAML", "line 3"]), (binary, ["binary.yaml", "UTF-8", "0xff"])):
        result = CliRunner().invoke(app, ["recipe", "check", str(path)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "<unicode string>" not in result.stderr and "Traceback" not in result.stderr
        assert all(w in result.stderr for w in words), result.stderr


def test_a_real_process_with_undecodable_bytes_and_markup_in_its_arguments():
    """Through the console script's own interpreter, not the test runner's streams."""
    for args, named in (([os.fsencode(BAD_BYTES + ".yaml")], "bad\\udcff"),
                        ([TINY, "data.source=[/]*.jsonl"], "[/]*.jsonl")):
        proc = subprocess.run([sys.executable, "-m", "llmtrain.cli", "recipe", "check", *args], capture_output=True,
                              text=True, errors="backslashreplace", timeout=120, env=checkout_env())
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and named in proc.stderr


def test_text_is_never_read_as_markup(tmp_path):
    out = tmp_path / "res[v2].json"
    result = CliRunner().invoke(app, ["profile", "--tokens", "8", "--vocab", "64", "--hidden", "8", "--heads", "softmax",
                                      "--no-measure", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"wrote {out}" in result.output
    # hand-written defaults survive in the help
    result = CliRunner().invoke(app, ["run", "--help"])
    assert "[default: runs/<name>-<time>]" in result.output and "<bool>" not in result.output
