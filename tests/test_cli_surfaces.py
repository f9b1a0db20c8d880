"""One surface for every command: version, shipped recipes, one head-spec syntax, one default dtype,
budgets with units, choices shown and checked, SLURM extras, top-p, paths checked by `recipe check`."""

import json
import re
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml
from typer.testing import CliRunner

import llmtrain
from conftest import ROOT, checkout_env
from llmtrain.cli import MULTINODE_LAUNCHERS, app
from llmtrain.launch.local import MULTINODE_LAUNCHERS as LAUNCHERS_OF_THE_LAUNCHER
from llmtrain.profile.estimate import estimate_head

TINY = str(ROOT / "recipes" / "tiny.yaml")


def invoke(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def test_the_command_line_imports_no_torch():
    probe = "import sys, llmtrain.cli; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=checkout_env(), check=True)
    assert out.stdout.split() == ["False", "False"]


def test_version():
    assert invoke("--version").stdout == f"llmtrain {llmtrain.__version__}\n"
    assert 'version = {attr = "llmtrain.__version__"}' in (ROOT / "pyproject.toml").read_text()


def test_recipe_list_and_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listed = invoke("recipe", "list").stdout
    assert sorted(line.split()[0] for line in listed.splitlines()) == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    invoke("recipe", "copy", "tiny", "mine/t.yaml")
    assert (tmp_path / "mine" / "t.yaml").read_text() == (ROOT / "recipes" / "tiny.yaml").read_text()
    before = (tmp_path / "mine" / "t.yaml").stat().st_mtime_ns
    assert "exists" in invoke("recipe", "copy", "tiny-tempnet", "mine/t.yaml", code=2).stderr
    assert (tmp_path / "mine" / "t.yaml").stat().st_mtime_ns == before  # nothing overwritten
    # a recipe with its own model folder: the copy works from here, not only from the repository
    invoke("recipe", "copy", "hf-tiny-qwen2", "mine")
    assert (tmp_path / "mine" / "hf-tiny-qwen2" / "config.json").is_file()
    checked = yaml.safe_load(invoke("recipe", "check", "mine/hf-tiny-qwen2.yaml").stdout)
    assert checked["model"]["hf"] == "mine/hf-tiny-qwen2" and checked["model"]["layers"] == 4


@pytest.mark.slow
def test_the_wheel_ships_the_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("llmtrain-*.whl"))).namelist()
    for path in (ROOT / "recipes").glob("*.yaml"):
        assert f"llmtrain/recipes/{path.name}" in names
    assert "llmtrain/recipes/hf-tiny-qwen2/config.json" in names


def test_choices_are_shown_and_checked():
    assert "--preset <gemma2-2b|llama3-8b|qwen2.5-7b>" in invoke("profile", "--help").stdout
    assert "--dtype <fp32|bf16>" in invoke("profile", "--help").stdout
    assert "--dtype <fp32|bf16>" in invoke("bench", "heads", "--help").stdout
    assert "--device <auto|cpu|cuda>" in invoke("bench", "heads", "--help").stdout
    assert "--launcher <" + "|".join(MULTINODE_LAUNCHERS) + ">" in invoke("run", "--help").stdout
    assert MULTINODE_LAUNCHERS == LAUNCHERS_OF_THE_LAUNCHER
    assert "'mpi' is not one of" in invoke("run", TINY, "--launcher", "mpi", code=2).stderr


def test_one_default_dtype():
    assert "fp32" in re.search(r"--dtype.*?\[default: (\w+)\]", invoke("bench", "heads", "--help").stdout, re.S).group(1)
    assert "[default: fp32]" in invoke("profile", "--help").stdout
    report = json.loads(invoke("profile", "--tokens", 64, "--vocab", 256, "--hidden", 16, "--heads", "softmax",
                               "--no-measure", "--json", "-").stdout)
    assert report["target"]["precision"] == "fp32"


def test_one_head_spec_syntax_and_json_to_stdout():
    result = invoke("profile", "--tokens", 64, "--vocab", 4096, "--hidden", 16, "--heads", "softmax,cce:chunk_size=16",
                    "--budget", "1GiB", "--no-measure", "--json", "-")
    report = json.loads(result.stdout)  # stdout holds the JSON alone; the table went to stderr
    assert "Memory per rank" in result.stderr and "≤ 1GiB (1.0 GiB)" in result.stderr
    spec = report["heads"]["cce:chunk_size=16"]["spec"]
    assert spec["chunk_size"] == 16
    reference = estimate_head({"type": "cce", "chunk_size": 16}, 64, 16, 4096, "fp32")
    assert report["heads"]["cce:chunk_size=16"]["estimate"]["head_total"] == reference.head_total
    from llmtrain.bench import _head_variants

    assert _head_variants("softmax,cce:chunk_size=16")[1] == ("cce:chunk_size=16", "cce",
                                                             {k: v for k, v in spec.items() if k != "type"})


def test_budget_row_in_the_figures_unit():
    result = invoke("profile", "--tokens", 64, "--vocab", 256, "--hidden", 16, "--heads", "softmax", "--budget", "80GB",
                    "--no-measure")
    assert "≤ 80GB (74.51 GiB)" in result.stdout or "≤ 80GB (74.5 GiB)" in result.stdout, result.stdout


def _sbatch(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_launch_slurm_layout_from_the_recipe_and_extras(tmp_path):
    script = invoke("launch", "slurm", TINY, "--nodes", 4, "--account", "proj_1", "--qos", "high", "--constraint",
                    "a100&ib", "--sbatch-line", "--mail-type=END", "--sbatch-line", "#SBATCH --exclusive",
                    "--dry-run").stdout
    lines = _sbatch(script)
    assert "--nodes=4" in lines and "--ntasks-per-node=2" in lines and "--gpus-per-node=2" in lines  # recipe: 2
    for line in ("--account=proj_1", "--qos=high", "--constraint=a100&ib", "--mail-type=END", "--exclusive"):
        assert line in lines
    assert "launch.nodes=4" in script and "launch.ranks_per_node=2" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # the same value as the recipe's is no contradiction; an override changes what the flag must agree with
    assert "--gpus-per-node=8" in _sbatch(invoke("launch", "slurm", TINY, "launch.ranks_per_node=8", "--gpus-per-node", 8,
                                                 "--dry-run").stdout)
    invoke("launch", "slurm", TINY, "--gpus-per-node", 2, "--dry-run")


def test_recipe_check_finds_missing_paths(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello")
    invoke("recipe", "check", TINY, f"data.source={corpus}")
    invoke("recipe", "check", TINY, f"data.source={corpus}/*.txt")
    result = invoke("recipe", "check", TINY, f"data.source={corpus}/*.jsonl", f"tokenizer.path={tmp_path}/tok.json",
                    "temperature.mode=frozen_body", f"temperature.init_from={tmp_path}/run", code=2)
    for key in ("data.source", "tokenizer.path", "temperature.init_from"):
        assert key in result.stderr
    assert "3 problems" in result.stderr


def _tiny_model(vocab: int, scale: float):
    from llmtrain.model.language_model import LanguageModel
    from llmtrain.recipe import ModelConfig

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=1, d_model=16, n_heads=2, seq_len=8), {"type": "softmax"}, vocab).eval()
    with torch.no_grad():
        model.head.weight.mul_(scale)
    return model


@pytest.mark.parametrize("vocab, scale, p", [(300, 1.0, 0.9), (300, 200.0, 0.5)])
def test_top_p_samples_the_nucleus_by_its_renormalized_probabilities(vocab, scale, p):
    """Reference: the full softmax in float64; the nucleus is the fewest best tokens whose mass reaches p.
    At scale 1 the distribution is nearly flat, so the nucleus is far past the first 64 candidates."""
    from llmtrain.generate import next_tokens

    model = _tiny_model(vocab, scale)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        probs = torch.softmax(model.head.logits(model.body(ids)[:, -1]).double(), -1)[0]
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    nucleus = order[before < p]
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([next_tokens(model, ids.repeat(1000, 1), 1.0, None, g, top_p=p) for _ in range(8)])
    assert set(draws.tolist()) <= set(nucleus.tolist())
    counts = torch.bincount(draws, minlength=vocab).double() / len(draws)
    assert (counts - expected).abs().sum() / 2 < 0.15  # total variation over 8,000 draws (flat case: ≈ 0.07)
    if scale == 1.0:
        assert len(nucleus) > 64 and len(set(draws.tolist())) > 64  # the candidates grew past the first 64


def test_a_preset_takes_overrides():
    report = json.loads(invoke("profile", "--preset", "llama3-8b", "train.micro_batch=2", "model.seq_len=4096",
                               "--heads", "cce", "--no-measure", "--json", "-").stdout)
    assert report["target"]["tokens"] == 2 * 4096
