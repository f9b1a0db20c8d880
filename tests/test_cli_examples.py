"""The examples in every command's --help work when pasted in order: the main help's chain first
(copy a recipe, check it, train, resume, export, generate), then each command's own. The fast test
runs the ones that start no training; the slow one runs them all, in order, those that train
(or read a run) through real processes."""

import os
import shlex
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from conftest import ROOT, checkout_env
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


@pytest.mark.slow
@pytest.mark.timeout(3600)  # three short trainings, an export, generation and benchmarks on 2 cores
def test_every_example_works_pasted_in_order(tmp_path, monkeypatch):
    """In order; those that start no training in this process (as the fast test runs them: the
    same code, without a fresh interpreter each), the rest as real processes."""
    cwd = _workspace(tmp_path)
    monkeypatch.chdir(cwd)
    cache = str(ROOT / ".cache" / "llmtrain")  # the checkout's data cache
    monkeypatch.setenv("LLMTRAIN_CACHE", cache)
    env = {**checkout_env(), "LLMTRAIN_CACHE": cache}
    for example in help_examples():
        args = shlex.split(example)[1:]
        if args[0] not in TRAINS:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, f"{example}\n{result.output}"
            continue
        proc = subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{example}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert (cwd / "exported" / "tiny" / "model.safetensors").is_file()
    assert os.listdir(cwd / "runs" / "tiny" / "checkpoints")
