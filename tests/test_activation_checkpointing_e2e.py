"""Activation checkpointing end to end through the CLI with 2 DeepSpeed ranks on CPU: the logged
losses equal those of the same run without it, at every ZeRO stage for our body and at ZeRO-2/3
for a Hugging Face (Llama) body, and every block is recomputed in backward, under ZeRO-3 with its
weights gathered again."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TESTS, checkout_env, llmtrain, records

pytestmark = pytest.mark.slow

STEPS = 4
SHORT = [f"train.steps={STEPS}", "eval.every=100", "checkpoint.every=100"]
# ZeRO-3 keeps parameters under 1e5 elements whole (every weight of these tiny models), and after
# the first step keeps a small model's weights gathered (reuse distance) or fetches them ahead
# (prefetch). With all three at 0 every weight is released after each module's forward, so the
# recomputation inside backward runs, at every step, only if it gathers the block's weights again.
ZERO3 = [f"deepspeed.config.zero_optimization.{key}=0"
         for key in ("stage3_param_persistence_threshold", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size")]


def run(recipe, out, stage: int, checkpointing: bool) -> tuple[dict[int, float], list[list[dict]]]:
    """The logged losses by step, and each rank's probe records (tests/recompute_probe): one per
    training-mode forward of a block, with whether it ran in backward and which blocks' weights
    were whole then."""
    probe = out.parent / f"{out.name}.probe"
    pythonpath = os.pathsep.join([str(TESTS / "recompute_probe"), checkout_env()["PYTHONPATH"]])
    llmtrain("run", recipe, f"deepspeed.zero_stage={stage}", *SHORT, *(ZERO3 if stage == 3 else []),
             f"model.activation_checkpointing={str(checkpointing).lower()}", "--out", out,
             env={"RECOMPUTE_PROBE": str(probe), "PYTHONPATH": pythonpath})
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["model"]["activation_checkpointing"] is checkpointing
    calls = [[json.loads(line) for line in Path(f"{probe}.{rank}").read_text().splitlines()] for rank in (0, 1)]
    return {r["step"]: r["loss"] for r in records(out)}, calls


def check_equal_and_recomputed(recipe, tmp_path, stage: int, layers: int = 2):
    without, plain = run(recipe, tmp_path / "without", stage, False)
    with_, checkpointed = run(recipe, tmp_path / "with", stage, True)
    assert list(with_) == list(range(1, STEPS + 1))
    assert with_ == without
    forward = [(i, False) for i in range(layers)]
    recompute = [(i, True) for i in reversed(range(layers))]  # backward reaches the last block first
    for rank in (0, 1):
        assert [(c["block"], c["backward"]) for c in plain[rank]] == forward * STEPS
        assert [(c["block"], c["backward"]) for c in checkpointed[rank]] == (forward + recompute) * STEPS
        for c in checkpointed[rank]:
            assert c["whole"][c["block"]], c  # every run of a block had its weight, recomputation included
            if stage == 3 and not c["backward"]:
                # the earlier blocks' weights were released after their forward, so the recomputation gathered them again
                assert not any(c["whole"][:c["block"]]), c


@pytest.fixture(scope="module")
def hf_recipe(recipe, tmp_path_factory):
    """The e2e recipe with a tiny random Llama folder as the body (the config decides the architecture)."""
    transformers = pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(base / "llama")
    body = yaml.safe_load(recipe.read_text())
    body["model"] = {"hf": str(base / "llama"), "seq_len": body["model"]["seq_len"]}
    path = base / "hf.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# Exact equality: each rank recomputes a block with the same kernels on the same inputs, and the
# gathered ZeRO-3 weights are the same values, so nothing downstream of the forward differs.
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_our_body_recomputes_and_its_losses_equal_the_run_without_it(recipe, tmp_path, stage):
    check_equal_and_recomputed(recipe, tmp_path, stage)


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_body_recomputes_and_its_losses_equal_the_run_without_it(hf_recipe, tmp_path, stage):
    check_equal_and_recomputed(hf_recipe, tmp_path, stage)
