"""Every key documented where users look: `llmtrain recipe keys` prints each key of the one schema
(head options included) with its type, default and description; the shipped recipes' comments
name only keys and commands that exist."""

import re

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from conftest import ROOT
from llmtrain.cli import app
from llmtrain.heads import HEADS, head_class
from llmtrain.recipe import Recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _schema():
    """(key, default, description, head) for every key, walked from the pydantic models themselves."""
    for name, field in Recipe.model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if section is None:
            yield name, field.get_default(call_default_factory=True), field.description, None
            continue
        for key, sub in section.model_fields.items():
            yield f"{name}.{key}", sub.get_default(call_default_factory=True), sub.description, None
        if name == "head":
            for head in HEADS:
                for key, sub in head_class(head).Options.model_fields.items():
                    yield f"head.{key}", sub.get_default(), sub.description, head


def _keys_output(*args):
    result = CliRunner().invoke(app, ["recipe", "keys", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_recipe_keys_documents_every_key_with_type_default_and_description():
    out = _keys_output()
    entries = {}
    for header, description in re.findall(r"^(\S.*)\n    (.*)$", out, flags=re.M):
        key = header.split(" ")[0].rstrip(":")
        entries.setdefault(key, []).append((header, description))
    for key, default, description, head in _schema():
        assert key in entries, f"{key} is not documented"
        shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                               default_flow_style=True).strip().removesuffix("...").strip()
        matches = [h for h, d in entries[key] if d == (description or "") and h.endswith(f", default {shown}")
                   and (head is None or head in h)]
        assert matches, f"{key}{' (' + head + ')' if head else ''}: {entries[key]} lacks default {shown} or '{description}'"
    assert len(out.splitlines()) == 2 * sum(len(v) for v in entries.values())  # nothing else printed


def test_recipe_keys_of_one_section():
    head = _keys_output("head")
    assert "head.n_clusters (head.type hsm)" in head and "head.b (head.type zloss)" in head and "train." not in head
    assert all(line.startswith(("train.", "    ")) for line in _keys_output("train").splitlines())


def test_recipe_check_prints_every_default():
    result = CliRunner().invoke(app, ["recipe", "check", str(ROOT / "recipes" / "tiny.yaml"), "head.type=hsm"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    for key, _, _, head in _schema():
        if head in (None, "hsm"):
            section, _, name = key.rpartition(".")
            assert name in (printed[section] if section else printed), f"{key} not printed"


def _comments(path):
    return "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_comments_name_real_keys_and_commands(path):
    comments = _comments(path)
    keys = {k for k, *_ in _schema()}
    named_keys = re.findall(r"\b([a-z_]+\.[a-z_]+)=", comments)
    for key in named_keys:
        assert key in keys, f"{path.name}: the comment names {key}, which no recipe has"
    for command in re.findall(r"(?:`|^\s+)llmtrain ([a-z]+)(?: ([a-z]+))?", comments, flags=re.M):
        words = [command[0], command[1]] if command[0] in ("recipe", "launch", "bench", "checkpoint") else [command[0]]
        result = CliRunner().invoke(app, [*words, "--help"])
        assert result.exit_code == 0, f"{path.name}: `llmtrain {' '.join(words)}` is no command"
    # every key a recipe sets in its body (with its comment, if any) is a key of the schema
    body = yaml.safe_load(path.read_text())
    for section, values in body.items():
        for key in values if isinstance(values, dict) else []:
            assert f"{section}.{key}" in keys, f"{path.name}: {section}.{key}"


def test_the_default_recipe_points_to_the_key_documentation():
    assert "`llmtrain recipe keys`" in _comments(ROOT / "recipes" / "tiny.yaml")
