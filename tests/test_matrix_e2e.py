"""The end-to-end matrix through the real CLI, 2 ranks on CPU. Each cell is trained uninterrupted
(a checkpoint every 2 steps), then a copy of its run as stopped after step 2 is resumed with
--resume auto on the same ranks with activation checkpointing switched on (the torchrun cell:
stopped by --stop-after 2 at another stage); the resumed run's every logged quantity equals the
uninterrupted run's (conftest.assert_resumed_exactly: checkpointing changes no loss, and a run may
resume with it switched), and the probe (tests/recompute_probe) saw every block recomputed in each
resumed step's backward; then the cell is exported and the export checked against the logged
evaluation.

Cells: each code path once, not the whole product (heads × ZeRO stages × options):

  cell      head     ZeRO   also                           why
  zero0     softmax  0      tied embeddings, grad_accum 2, ZeRO-0 (whole weights, our own non-finite
                           shards of 1,024 tokens          check), the tied weight saved and exported
                                                           once into a Llama folder; val_loss, val_bpb,
                                                           val_top* against transformers on the export;
                                                           2 ranks reading blocks across many small
                                                           shards, stopped and resumed exactly
  zero1     zloss    1      optimizer offload to CPU       ZeRO-1; DeepSpeed's CPU optimizer; zloss's
                                                           eval branch (top-k only) and its export (no
                                                           Llama equivalent): top-k recomputed from the
                                                           exported weights as plain scores h·Wᵀ
  zero3     hsm      3      bf16                           hsm's clusters from the data, its eval under
                                                           ZeRO-3 (weights gathered outside forward),
                                                           bf16 mode, a ZeRO-3 resume on the same ranks;
                                                           resumed with deepspeed.config keys that make
                                                           ZeRO-3 release every weight after use: the
                                                           probe sees them released (the merge took
                                                           effect) and each recomputation gather again
  torchrun  cce      1 → 2  the torchrun launcher,         cce; torchrun; a resume that changes the ZeRO
                           filter_eps 1e-4 spelled         stage (a universal checkpoint), held to the
                           otherwise on resume             uninterrupted ZeRO-2 run to 1e-6; the same
                                                           checkpoint refused at ZeRO-3 (exit 2: DeepSpeed
                                                           0.19.8 cannot load ZeRO-1/2 files at stage 3)
                                                           and with another filter_eps; equivalent
                                                           spellings and defaults written out accepted

Activation checkpointing is thus checked at ZeRO 0, 1, 2 (the torchrun cell, to 1e-6; exactly in
test_train_e2e's SIGTERM/SIGINT/SIGUSR1 resumes) and 3 for our body; Hugging Face bodies in
test_hf_e2e. Covered elsewhere, not repeated: softmax at ZeRO-2, SIGTERM/SIGINT/SIGUSR1 and
--stop-after resumes, TempNet's dropout across a resume, pruning past keep_last, a signal before
the ranks exist (test_train_e2e); softmax at ZeRO-3, SIGUSR1 under SLURM, 2 → 1 → 2 ranks, a ZeRO-3
resume on another world size, ZeRO-3 → ZeRO-1/2 refused, export against transformers (test_clusters_e2e); Hugging Face bodies at every stage
(test_hf_e2e); faults (test_faults_e2e)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (CHECKPOINTING, RELEASE_WEIGHTS, assert_recomputed, assert_resumed_exactly, by_step,
                      independent_validation_metrics, llmtrain, metrics_lines, recompute_probe, records,
                      stopped_copy, top_k_tolerance, validation_blocks)

pytestmark = pytest.mark.slow

STEPS = 4
SHORT = [f"train.steps={STEPS}", "eval.every=2", "checkpoint.every=2", "data.val_fraction=0.2"]  # 8 validation blocks
CELLS = {
    "zero0": ["deepspeed.zero_stage=0", "head.type=softmax", "model.tie_embeddings=true", "train.grad_accum=2",
              "data.shard_tokens=1024"],  # the smallest shard a recipe allows: the corpus spans many
    "zero1": ["deepspeed.zero_stage=1", "head.type=zloss", "deepspeed.offload_optimizer=cpu"],
    "zero3": ["deepspeed.zero_stage=3", "head.type=hsm", "train.precision=bf16"],
}


def train_and_resume(recipe, tmp_path, args, rel=0.0):
    """The uninterrupted run (checkpoints at steps 2 and 4), and its copy as stopped after step 2
    (conftest.stopped_copy) resumed with activation checkpointing on: equal, and every block
    recomputed in the resumed steps."""
    straight, split, probe = tmp_path / "straight", tmp_path / "split", tmp_path / "probe"
    llmtrain("run", recipe, "--out", straight, *SHORT, *args)
    segment = stopped_copy(straight, split, 2)
    released = "deepspeed.zero_stage=3" in args
    resumed = llmtrain("run", recipe, "--out", split, "--resume", "auto", *SHORT, *args, CHECKPOINTING,
                       *(RELEASE_WEIGHTS if released else []), env=recompute_probe(probe))
    assert assert_resumed_exactly(split, straight, segment, resumed.stderr, rel=rel) == 2
    assert sorted(by_step(split)) == list(range(1, STEPS + 1)) and by_step(split)[STEPS] < by_step(split)[1]
    assert_recomputed(split, probe, STEPS - 2, released=released)
    return split


def model_recipe(run):
    from llmtrain.recipe import Recipe

    return Recipe.model_validate(yaml.safe_load((run / "recipe.resolved.yaml").read_text()))


def exported_model(run, out):
    from llmtrain.export import load_exported

    llmtrain("export", run, "--out", out)
    return load_exported(out)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_trains_resumes_exactly_and_exports(recipe, tmp_path, cell):
    run = train_and_resume(recipe, tmp_path, CELLS[cell])
    model = exported_model(run, tmp_path / "export")
    logged = records(run, "val_top1")[-1]
    assert logged["step"] == STEPS
    blocks = validation_blocks(run)
    targets = blocks[:, 1:].flatten()
    with torch.no_grad():
        hidden = model.body(blocks[:, :-1]).flatten(0, 1)
    if cell == "zero0":
        data = json.loads((run / "data.json").read_text())
        assert len(list(Path(data["train_path"]).glob("*.bin"))) > 10
        assert (tmp_path / "export" / "hf").is_dir()
        theirs = independent_validation_metrics(run, tmp_path / "export" / "hf")
        for key in ("val_loss", "val_bpb"):
            assert logged[key] == pytest.approx(theirs[key], rel=1e-5), key
        for k in (1, 5, 10):  # float32 against float64: at most one near tie may rank differently
            assert abs(logged[f"val_top{k}"] - theirs[f"val_top{k}"]) <= theirs["one_token"], k
    elif cell == "zero1":
        assert "val_loss" not in logged  # not a distribution: no loss, no perplexity
        top = (hidden.double() @ model.head.weight.double().T).topk(10).indices == targets[:, None]
        for k in (1, 5, 10):  # standardizing a token's scores keeps their order
            assert abs(logged[f"val_top{k}"] - top[:, :k].any(1).double().mean().item()) <= top_k_tolerance(blocks), k
    else:
        from llmtrain.model.language_model import LanguageModel

        default = LanguageModel(model_recipe(run).model, model_recipe(run).head_spec(), model.head.vocab_size)
        tables = [name for name, _ in model.head.named_buffers() if name in model.head.state_dict()]
        assert tables and any(not torch.equal(model.head.get_buffer(n), default.head.get_buffer(n)) for n in tables), \
            "the exported clusters are the default ones, not those built from the data"
        with torch.no_grad():
            nll = -model.head.token_logprobs(hidden, targets).double().mean().item()
        assert logged["val_loss"] == pytest.approx(nll, rel=2e-2)  # trained and evaluated in bf16


# cce's filter_eps as the first run spells it, and the same head spelled otherwise with its defaults
# written out: a resume accepts the second as the same model.
CCE = ["head.type=cce", "head.filter_eps=1e-4"]
CCE_SPELLED = ["head.type=cce", "head.filter_eps=1.0E-4", "head.z_loss=0", "head.label_smoothing=0.0e0",
               "head.bias=false", "head.softcap=~", "head.chunk_size=null"]


def test_torchrun_cce_resume_changes_the_zero_stage(recipe, tmp_path):
    """Stopped at ZeRO-1, refused at ZeRO-3 and with another filter_eps (exit 2, nothing started),
    resumed under torchrun at ZeRO-2 with the head spelled otherwise (equivalent spellings, defaults
    written out): the uninterrupted ZeRO-2 run to 1e-6."""
    z2 = ["launch.launcher=torchrun", "deepspeed.zero_stage=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    llmtrain("run", recipe, "--out", split, *SHORT, *CCE, "deepspeed.zero_stage=1", "--stop-after", 2)
    refused = llmtrain("run", recipe, "--out", split, "--resume", "auto", *SHORT, *CCE,
                       "deepspeed.zero_stage=3", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "ZeRO-1 checkpoint with deepspeed.zero_stage=3" in refused.stderr
    other = llmtrain("run", recipe, "--out", split, "--resume", "auto", *SHORT, "head.type=cce", "head.filter_eps=2e-4",
                     *z2, check=False)
    assert other.returncode == 2 and "filter_eps" in other.stderr and "Traceback" not in other.stderr
    assert not (split / "checkpoints" / "universal").exists() and len(records(split)) == 2
    llmtrain("run", recipe, "--out", straight, *SHORT, *CCE, *z2)
    segment = metrics_lines(split)
    probe = tmp_path / "probe"
    resumed = llmtrain("run", recipe, "--out", split, "--resume", "auto", *SHORT, *CCE_SPELLED, *z2, CHECKPOINTING,
                       env=recompute_probe(probe))
    assert "universal checkpoint" in resumed.stderr
    assert assert_resumed_exactly(split, straight, segment, resumed.stderr, rel=1e-6) == 2
    assert_recomputed(split, probe, STEPS - 2)
    llmtrain("export", split, "--out", tmp_path / "export")
    theirs = independent_validation_metrics(split, tmp_path / "export" / "hf")
    assert records(split, "val_loss")[-1]["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
