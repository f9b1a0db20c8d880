"""Values are normalized by their schema before they are stored or compared: head options typed by
the head's own schema with every default written out, numbers however they are spelled, booleans
refused where numbers go, and resume comparing typed values (end to end: test_matrix_e2e's torchrun
cell resumes with cce's head spelled otherwise and refuses another filter_eps)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TESTS
from llmtrain.cli import app
from llmtrain.errors import UserError
from llmtrain.heads import HEADS, head_class
from llmtrain.recipe import load_recipe, validate_recipe
from llmtrain.train.checkpoint import identity_problems

SPELLINGS_OF_1E_4 = ["1e-4", "1.0e-4", "0.0001", "1E-4", "+1e-4", "1.e-4", "10e-5"]


def _spec(**options):
    """The reference: the cce head's options as its schema's defaults, overridden with Python values."""
    return {"type": "cce", **head_class("cce").Options().model_dump(), **options}


@pytest.mark.parametrize("text", SPELLINGS_OF_1E_4)
def test_a_head_option_is_one_typed_value_however_spelled(text, tmp_path):
    by_override = validate_recipe({}, ["head.type=cce", f"head.filter_eps={text}"]).head_spec()
    path = tmp_path / "r.yaml"
    path.write_text(f"head:\n  type: cce\n  filter_eps: {text}\n")
    for spec in (by_override, load_recipe(path).head_spec()):
        assert spec == _spec(filter_eps=1e-4)
        assert type(spec["filter_eps"]) is float


def test_numbers_without_a_schema_type_are_numbers_too():
    """deepspeed.config is free-form (Any): only the YAML reading can make `1e-8` a number there."""
    recipe = validate_recipe({}, ["deepspeed.config={optimizer: {params: {eps: 1e-8}}}"])
    assert recipe.deepspeed.config["optimizer"]["params"]["eps"] == 1e-8


@pytest.mark.parametrize("head", list(HEADS))
def test_every_default_is_written_out_where_the_recipe_is_stored(head, tmp_path):
    result = CliRunner().invoke(app, ["recipe", "check", str(TESTS.parent / "recipes" / "tiny.yaml"), f"head.type={head}"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)["head"]
    assert printed == {"type": head, **head_class(head).Options().model_dump(mode="json")}


@pytest.mark.parametrize("override, key", [
    ("train.steps=true", "train.steps"), ("train.lr=false", "train.lr"), ("deepspeed.zero_stage=true", "deepspeed.zero_stage"),
    ("launch.master_port=true", "launch.master_port"), ("head.z_loss=true", "head.z_loss"), ("head.softcap=true", "head.softcap"),
])
def test_booleans_are_refused_where_numbers_go(override, key):
    with pytest.raises(UserError) as info:
        validate_recipe({}, [override])
    assert str(info.value) == f"recipe: {key}: a number goes here, not {override.split('=')[1]}"


def test_booleans_stay_booleans_where_they_go():
    assert validate_recipe({}, ["model.tie_embeddings=true", "head.bias=false"]).model.tie_embeddings is True


def _meta(recipe, head):
    return {"identity": {**recipe.identity(), "head": head}, "tokenizer_hash": "h"}


def test_resume_compares_typed_values_not_spellings():
    ours = validate_recipe({}, ["head.type=cce", "head.filter_eps=0.0001", "head.z_loss=0.0", "head.chunk_size=null"])
    # as older code stored it: the raw override string, no defaults
    assert identity_problems(_meta(ours, {"type": "cce", "filter_eps": "1e-4"}), ours.identity(), "h") == []
    assert identity_problems(_meta(ours, {"type": "cce", "filter_eps": 1e-4, "z_loss": 0}), ours.identity(), "h") == []
    changed = identity_problems(_meta(ours, {"type": "cce", "filter_eps": "2e-4"}), ours.identity(), "h")
    assert len(changed) == 1 and "filter_eps=0.0002 where the recipe has 0.0001" in changed[0]


def test_the_old_fixture_checkpoint_matches_todays_recipe():
    """Its head identity is {'type': 'softmax'}, stored before defaults were written out."""
    fixture = TESTS / "fixtures" / "main-2026-11-29"
    meta = json.loads((fixture / "run" / "checkpoints" / "step00000002" / "llmtrain.json").read_text())
    assert meta["identity"]["head"] == {"type": "softmax"}
    recipe = load_recipe(fixture / "run" / "recipe.resolved.yaml")
    assert identity_problems(meta, recipe.identity(), meta["tokenizer_hash"]) == []
