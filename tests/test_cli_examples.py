"""The examples in every command's --help work when pasted in order: the main help's chain first
(copy a recipe, check it, train, resume, export, generate), then each command's own. The fast test
runs the ones that start no training; the slow one runs them all, in order, those that train
(or read a run) through real processes."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import ROOT, checkout_env, records, shrink_recipe
from llmtrain.cli import app

TRAINS = ("run", "export", "generate", "bench", "checkpoint", "compare", "study")  # need a run, or start worker processes


def _commands(group, path=()):
    """The command paths under a click group, the group's own first; hidden ones left out."""
    yield path
    for name, command in getattr(group, "commands", {}).items():
        if not command.hidden:
            yield from _commands(command, (*path, name))


def help_examples() -> list[str]:
    """Every example line of every help, the main help's first, each once, in order."""
    found = []
    for path in _commands(typer.main.get_command(app)):
        text = CliRunner().invoke(app, [*path, "--help"]).stdout
        examples = text.split("Example", 1)[1] if "Example" in text else ""
        found += [line.strip() for line in examples.splitlines() if line.strip().startswith("llmtrain ")]
    return list(dict.fromkeys(found))


def _workspace(tmp_path):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # examples name recipes/… as in the repository
    return tmp_path


def test_every_command_has_examples():
    root = typer.main.get_command(app)
    for path in _commands(root):
        command = root
        for name in path:
            command = command.commands[name]
        if path and hasattr(command, "commands"):
            continue  # a group: its commands have their own
        text = CliRunner().invoke(app, [*path, "--help"]).stdout
        assert "Example" in text and "llmtrain " in text.split("Example", 1)[1], path


def test_examples_that_start_no_training_work_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(_workspace(tmp_path))
    for example in help_examples():
        args = shlex.split(example)[1:]
        if args[0] in TRAINS:
            continue
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{example}\n{result.output}"


def stop_then_continue(args, cwd, env):
    """The study example, stopped by SIGTERM once its second variant has trained a step, then
    pasted again: it continues where it stopped (the finished variant skipped and untouched, the
    stopped one resumed, each step logged once) and writes its report."""
    named = Path(args[args.index("--out") + 1])  # as the command names it (relative to cwd)
    out, steps = cwd / named, int(next(a for a in args if a.startswith("train.steps="))[len("train.steps="):])
    cmd = [sys.executable, "-m", "llmtrain.cli", *args]
    first = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
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
    assert records(out / "hsm")[-1]["step"] < steps

    again = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, f"{shlex.join(args)}\n{again.stdout[-2000:]}\n{again.stderr[-4000:]}"
    assert "study: softmax is complete, skipped" in again.stderr
    assert f"resuming from {named / 'hsm' / 'checkpoints'}" in again.stderr
    assert (out / "softmax" / "metrics.jsonl").stat().st_mtime_ns == finished.st_mtime_ns  # untouched
    for name in ("softmax", "hsm"):
        logged = [r["step"] for r in records(out / name)]
        assert logged == list(range(1, steps + 1)), (name, logged)  # each step once, the resumed ones after the stop
        assert all(0 < r["mfu"] < 1 for r in records(out / name))
    table = (out / "report" / "table.md").read_text()
    final = records(out / "hsm", "val_loss")[-1]
    assert f"| hsm | hsm | complete | {steps}/{steps} |" in table and f"| {final['val_loss']:.4f} |" in table
    assert len(list((out / "report").glob("*.png"))) == 5


@pytest.mark.slow
@pytest.mark.timeout(3600)  # five short trainings, an export, generation and benchmarks on 2 cores
def test_every_example_works_pasted_in_order(tmp_path, monkeypatch):
    """In order; those that start no training in this process (as the fast test runs them: the
    same code, without a fresh interpreter each), the rest as real processes. The recipe the
    examples copy is shrunk once copied (conftest.shrink_recipe: the same keys, a tiny model on
    ~200 KB of data), so that each training is a few seconds; the study is stopped by SIGTERM
    in its second variant and pasted again (stop_then_continue)."""
    cwd = _workspace(tmp_path)
    monkeypatch.chdir(cwd)
    env = checkout_env()
    for example in help_examples():
        args = shlex.split(example)[1:]
        if args[0] == "study":
            stop_then_continue(args, cwd, env)
            continue
        if args[0] not in TRAINS:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, f"{example}\n{result.output}"
            if args[:2] == ["recipe", "copy"]:
                shrink_recipe(cwd / args[3], cwd / "cache")
            continue
        proc = subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{example}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert (cwd / "exported" / "tiny" / "model.safetensors").is_file()
    assert os.listdir(cwd / "runs" / "tiny" / "checkpoints")
    assert (cwd / "runs" / "study" / "report" / "table.md").is_file()
