"""A Hugging Face body (tiny Qwen2, tied, with weights) through `llmtrain run` on 2 real DeepSpeed
ranks: the first loss is transformers' own, every ZeRO stage trains the same trajectory, resume
is exact, a universal checkpoint moves it to 1 rank, and the export is a Qwen2 folder again."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from conftest import (CHECKPOINTING, MICRO_STEPS, RELEASE_WEIGHTS, TESTS, assert_recomputed, assert_resumed_exactly,
                      by_step, checkout_env, free_port, llmtrain, recompute_probe, stopped_copy)
from hf_models import save_tiny_model

pytestmark = pytest.mark.slow

STEPS = MICRO_STEPS


@pytest.fixture(scope="module")
def hf_recipe(recipe, tmp_path_factory):
    """The e2e recipe (tests/conftest.py) with the body replaced by a Qwen2 folder."""
    base = tmp_path_factory.mktemp("hf")
    folder = save_tiny_model(base / "qwen2", "qwen2", vocab_size=512)
    body = yaml.safe_load(recipe.read_text())
    body["model"] = {"hf": str(folder), "seq_len": body["model"]["seq_len"]}
    body["tokenizer"].pop("vocab_size")  # the config's vocabulary
    path = base / "hf.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def reference(hf_recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("hf-ref") / "run"
    llmtrain("run", hf_recipe, "--out", run)
    return run


def assert_same_trajectory(run: Path, reference: Path, steps, rel=1e-6):
    """Equal up to the order of floating-point reductions (seen: ≤ 2e-7 relative)."""
    ours, ref = by_step(run), by_step(reference)
    assert sorted(ours) == list(steps)
    for step in steps:
        assert ours[step] == pytest.approx(ref[step], rel=rel), step


def test_first_loss_is_transformers_loss_on_the_same_batches(reference):
    from llmtrain.data.packing import load_split
    from llmtrain.data.prepare import PreparedData
    from llmtrain.data.sampler import ResumableSampler

    resolved = yaml.safe_load((reference / "recipe.resolved.yaml").read_text())
    assert resolved["model"]["tie_embeddings"] is True and resolved["model"]["d_model"] == 64
    data = PreparedData.from_json((reference / "data.json").read_text())
    blocks = load_split(data.train_path, data.seq_len + 1)
    t = resolved["train"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolved["model"]["hf"], local_files_only=True)
    with torch.no_grad():
        losses = [hf(input_ids=(b := blocks[ResumableSampler(len(blocks), t["micro_batch"], rank, 2, t["seed"])
                                            .next_indices()]), labels=b).loss.item() for rank in range(2)]
    assert by_step(reference)[1] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert by_step(reference)[STEPS] < by_step(reference)[1]


@pytest.mark.parametrize("stage", [0, 1])  # ZeRO-2: the reference; ZeRO-3: test_zero3_resume_is_bit_exact
def test_every_zero_stage_trains_the_same_trajectory(hf_recipe, reference, tmp_path, stage):
    """With activation checkpointing on (transformers' own, every decoder layer recomputed): the
    reference's trajectory, run without it."""
    run, probe = tmp_path / f"z{stage}", tmp_path / "probe"
    llmtrain("run", hf_recipe, "--out", run, f"deepspeed.zero_stage={stage}", CHECKPOINTING, env=recompute_probe(probe))
    assert_same_trajectory(run, reference, range(1, STEPS + 1))
    assert_recomputed(run, probe, STEPS)


def test_zero3_resume_is_bit_exact(hf_recipe, reference, tmp_path):
    """ZeRO-3 trains the ZeRO-2 reference's trajectory; its run copied as stopped after step 3 (a
    checkpoint every 3 steps; conftest.stopped_copy) and resumed with activation checkpointing
    switched on (and ZeRO-3 releasing every weight after use) reproduces the uninterrupted run in
    every logged quantity, each layer recomputed with its weight gathered again."""
    straight, split, probe = tmp_path / "straight", tmp_path / "split", tmp_path / "probe"
    llmtrain("run", hf_recipe, "--out", straight, "deepspeed.zero_stage=3", "checkpoint.every=3")
    assert_same_trajectory(straight, reference, range(1, STEPS + 1))
    segment = stopped_copy(straight, split, 3)
    resumed = llmtrain("run", hf_recipe, "--out", split, "--resume", "auto", "deepspeed.zero_stage=3",
                       "checkpoint.every=3", CHECKPOINTING, *RELEASE_WEIGHTS, env=recompute_probe(probe))
    assert "(step 3, saved by 2 ranks)" in resumed.stderr
    assert assert_resumed_exactly(split, straight, segment, resumed.stderr) == 3
    assert_recomputed(split, probe, STEPS - 3, released=True)


def test_universal_checkpoint_continues_on_one_rank(hf_recipe, reference, tmp_path):
    """At ZeRO-2 with activation checkpointing switched on: the reference's trajectory."""
    run, probe = tmp_path / "one-rank", tmp_path / "probe"
    llmtrain("run", hf_recipe, "--out", run, "--resume", reference / "checkpoints" / "step00000004",
             "launch.ranks_per_node=1", "train.grad_accum=2", CHECKPOINTING, env=recompute_probe(probe))
    assert_same_trajectory(run, reference, range(5, STEPS + 1))
    assert_recomputed(run, probe, STEPS - 4)


def test_export_is_the_original_architecture_with_our_logits(reference, tmp_path):
    from llmtrain.export import load_exported

    out = tmp_path / "export"
    llmtrain("export", reference, "--out", out)
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True)
    ours = load_exported(out)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = ours.body(ids).flatten(0, 1)
        logits = torch.nn.functional.linear(hidden, ours.head.weight)
        torch.testing.assert_close(hf(input_ids=ids).logits.flatten(0, 1), logits, rtol=1e-5, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")  # the run's, beside the weights
    prompt = tokenizer("def main():", return_tensors="pt").input_ids
    greedy = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = llmtrain("generate", reference, "--prompt", "def main():", "--max-new-tokens", 6, "--temperature", 0)
    assert generated.stdout.rstrip("\n") == tokenizer.decode(greedy[0])  # greedy decoding agrees with transformers


def test_zero3_builds_the_model_partitioned_below_its_full_size(tmp_path):
    """Under ZeRO-3 each rank builds the model partitioned (deepspeed.zero.Init) and the weights are
    loaded into the partitions: no rank ever holds the whole fp32 model in its own memory, so a
    model larger than a rank's memory can start. The weights arrive intact: the first loss is
    transformers' on the same ids."""
    folder = save_tiny_model(tmp_path / "big", "llama", vocab_size=8000, hidden_size=512, intermediate_size=2048,
                             num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8, max_shard_size="40MB")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(TESTS / "hf_zero3_start.py"), str(folder)]
    env = {**checkout_env(), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[0][len("RESULT "):])
    assert result["weights_bytes"] > 250e6 and result["partitioned"]
    # seen: 0.75 of the full weights (half of them, plus the layer being loaded and the reads)
    assert result["max_peak_anonymous_bytes"] < 0.85 * result["weights_bytes"], result
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = torch.randint(0, 8000, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=ids).loss.item()
    assert result["first_loss"] == pytest.approx(expected, rel=1e-5)


def test_bad_model_folders_exit_2_before_anything_starts(hf_recipe, tmp_path):
    folder = Path(yaml.safe_load(hf_recipe.read_text())["model"]["hf"])
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "config.json").write_bytes((folder / "config.json").read_bytes())
    data = (folder / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 3])
    big_tokenizer = tmp_path / "tokenizer.json"
    from llmtrain.data.tokenizer import train_tokenizer

    train_tokenizer([" ".join(f"w{i}" for i in range(2000))] * 3, 700, min_frequency=1).save(str(big_tokenizer))
    cases = {
        "missing": (["model.hf=/nonexistent/model"], "model.hf: /nonexistent/model is not a folder"),
        "torn": ([f"model.hf={torn}"], "model.safetensors is not a readable safetensors file"),
        "tokenizer": ([f"tokenizer.path={big_tokenizer}"], "tokenizer.vocab_size: 512 is smaller than the tokenizer"),
        "override": (["model.d_model=128"], "model.d_model: 128, but"),
    }
    for name, (overrides, message) in cases.items():
        out = tmp_path / f"run-{name}"
        proc = llmtrain("run", hf_recipe, *overrides, "--out", out, check=False, timeout=120)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        said = " ".join(proc.stderr.split())  # rich wraps long lines
        assert message in said and "Traceback" not in said, (name, proc.stderr[-2000:])
        assert not out.exists(), name  # nothing started, no run folder
