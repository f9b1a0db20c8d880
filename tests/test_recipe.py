"""Recipe validation: good recipes pass, every kind of mistake is reported with its key."""

import pytest
import yaml

from llmtrain.errors import UserError
from llmtrain.recipe import load_recipe
from llmtrain.train.schedule import lr_at

RECIPES = sorted((__import__("pathlib").Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path, tmp_path):
    body = yaml.safe_load(path.read_text())
    overrides = []
    hf = body.get("model", {}).get("hf")
    if hf and not __import__("pathlib").Path(hf).exists():  # a placeholder for the user's download
        from hf_models import save_tiny_model

        overrides.append(f"model.hf={save_tiny_model(tmp_path / 'model', 'qwen2', weights=False)}")
    recipe = load_recipe(path, overrides)
    assert recipe.name == path.stem and recipe.world_size >= 1


def _write(tmp_path, body):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _errors(tmp_path, body, overrides=()):
    with pytest.raises(UserError) as info:
        load_recipe(_write(tmp_path, body), overrides)
    return str(info.value)


def test_defaults_and_name(tmp_path):
    recipe = load_recipe(_write(tmp_path, {}))
    assert recipe.name == "r" and recipe.head.type == "softmax" and recipe.deepspeed.zero_stage == 2


def test_overrides_are_typed_and_nested(tmp_path):
    recipe = load_recipe(_write(tmp_path, {}), ["train.steps=70", "deepspeed.zero_stage=3", "head.type=softmax",
                                                "head.softcap=30", "model.tie_embeddings=true", "train.lr=1e-3"])
    assert recipe.train.steps == 70 and recipe.deepspeed.zero_stage == 3
    assert recipe.head_spec() == {"type": "softmax", "bias": False, "softcap": 30.0, "z_loss": 0.0, "label_smoothing": 0.0}
    assert recipe.model.tie_embeddings is True and recipe.train.lr == 1e-3


def test_all_errors_reported_at_once_with_key_value_and_allowed(tmp_path):
    msg = _errors(tmp_path, {"model": {"d_modle": 64}, "train": {"precision": "fp16", "steps": 0},
                             "deepspeed": {"zero_stage": 4}, "evall": {}}, ["train.lr=-1", "oops"])
    assert "6 problems" in msg or "7 problems" in msg
    assert "model.d_modle: unknown key; did you mean 'd_model'?" in msg
    assert "train.precision: Input should be 'fp32' or 'bf16' (got 'fp16')" in msg
    assert "train.steps: Input should be greater than or equal to 1 (got 0)" in msg
    assert "deepspeed.zero_stage: Input should be 0, 1, 2 or 3 (got 4)" in msg
    assert "evall: unknown key; did you mean 'eval'?" in msg
    assert "train.lr: Input should be greater than 0 (got -1)" in msg
    assert "override 'oops': write overrides as key=value" in msg


def test_head_options_validated_by_the_head(tmp_path):
    assert "head.sofcap: unknown key; did you mean 'softcap'?" in _errors(tmp_path, {"head": {"sofcap": 3}})
    assert "head.type: unknown head 'sofmax'; did you mean 'softmax'?" in _errors(tmp_path, {"head": {"type": "sofmax"}})
    assert "head.softcap: Input should be greater than 0 (got -2)" in _errors(tmp_path, {"head": {"softcap": -2}})


def test_cross_field_rules(tmp_path):
    assert "d_model (100) must be divisible by n_heads (3)" in _errors(tmp_path, {"model": {"d_model": 100, "n_heads": 3}})
    assert "min_lr" in _errors(tmp_path, {"train": {"lr": 1e-4, "min_lr": 1e-3}})
    assert "offload_param needs zero_stage 3" in _errors(tmp_path, {"deepspeed": {"offload_param": "cpu"}})


def test_file_problems(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)


def test_lr_is_warmup_then_cosine():
    t = load_recipe(RECIPES[0].parent / "tiny.yaml").train.model_copy(update={"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr": 0.1})
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(55, t) == pytest.approx(0.55)
    assert lr_at(100, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))
