"""What a head can do is declared on its class: a fifth head registered in one line runs through
recipe validation, `profile --no-measure` and `bench heads`, and the other modules read its
capabilities instead of lists of names."""

import json

from typer.testing import CliRunner

from conftest import TESTS
from llmtrain.bench import app as bench_app
from llmtrain.cli import app
from llmtrain.heads import HEADS, head_class
from llmtrain.heads.temperature import temperature_problems
from llmtrain.recipe import validate_recipe


def register_fifth_head(monkeypatch):
    monkeypatch.setitem(HEADS, "fifth", "fifth_head:FifthHead")
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # for bench's worker processes


def test_a_registered_head_passes_validation_profile_and_bench(monkeypatch, tmp_path):
    register_fifth_head(monkeypatch)
    recipe = validate_recipe({"head": {"type": "fifth", "scale": 0.5}, "model": {"tie_embeddings": True}})
    assert recipe.head.type == "fifth"
    # its own options schema validates its options, naming the key
    try:
        validate_recipe({"head": {"type": "fifth", "scale": -1}})
    except Exception as e:
        assert "head.scale" in str(e)
    else:
        raise AssertionError("a negative scale was accepted")
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(app, ["profile", "--tokens", "64", "--vocab", "300", "--hidden", "16",
                                      "--heads", "softmax,fifth", "--no-measure", "--json", str(out)])
    assert result.exit_code == 0, result.output
    heads = json.loads(out.read_text())["heads"]
    assert heads["fifth"]["estimate"]["total"] > 0
    bench_json = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_app, ["heads", "--tokens", "48", "--vocab", "200", "--hidden", "16",
                                            "--repeats", "1", "--warmup", "1", "--device", "cpu", "--heads", "fifth",
                                            "--peers", "torch-eager", "--json", str(bench_json)])
    assert result.exit_code == 0, result.output
    by_name = {r["name"]: r for r in json.loads(bench_json.read_text())["results"]}
    assert by_name["fifth"]["status"] == "ok", by_name["fifth"]


def test_temperature_support_is_read_from_the_class(monkeypatch):
    register_fifth_head(monkeypatch)
    fifth = head_class("fifth")
    problems = temperature_problems(fifth, {})
    assert len(problems) == 1 and "the fifth head has no temperature network" in problems[0]
    # the heads that can serve one are listed from their declarations, the fifth not among them
    assert "use softmax, cce, hsm" in problems[0]
    monkeypatch.setattr(fifth, "supports_temperature", True)
    monkeypatch.setattr(fifth, "temperature_conflicts", {"scale": "the scale is not tempered"})
    assert temperature_problems(fifth, {}) == []
    assert "head.scale=0.5 cannot be used" in temperature_problems(fifth, {"scale": 0.5})[0]
    monkeypatch.setattr(fifth, "supports_temperature", False)
    monkeypatch.setattr(fifth, "scale_invariant", True)
    assert "scale-invariant" in temperature_problems(fifth, {})[0]
