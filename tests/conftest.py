import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).parent
ROOT = TESTS.parent
MICRO_STEPS = 8


def checkout_env() -> dict:
    """The environment of subprocesses: they import llmtrain from this checkout, not from
    wherever the package is installed."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "DS_ACCELERATOR": "cpu"}


def shrink_recipe(path: Path, cache_dir: Path) -> Path:
    """Rewrite the recipe at `path` (recipes/tiny.yaml or a copy of it) shrunk for end-to-end
    tests: 2 layers, d_model 32, vocabulary 512, MICRO_STEPS steps on ~200 KB of the standard
    library, logged every step, with its data cache in `cache_dir`."""
    body = yaml.safe_load(path.read_text())
    body["model"].update(layers=2, d_model=32, n_heads=2, seq_len=32)
    body["data"].update(max_bytes=200_000, cache_dir=str(cache_dir))
    body["tokenizer"].update(vocab_size=512, train_bytes=100_000)
    body["train"].update(steps=MICRO_STEPS, micro_batch=2, warmup_steps=2, log_every=1, lr=1e-2)
    body["checkpoint"].update(every=4, keep_last=3)
    body["eval"].update(every=4, batches=2)
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """recipes/tiny.yaml shrunk (shrink_recipe), with a data cache per test module."""
    base = tmp_path_factory.mktemp("e2e")
    path = base / "micro.yaml"
    path.write_text((ROOT / "recipes" / "tiny.yaml").read_text())
    return shrink_recipe(path, base / "cache")


def llmtrain(*args, timeout=300, check=True, env=None) -> subprocess.CompletedProcess:
    """`llmtrain ARGS` in a subprocess; a non-zero exit fails the test unless check=False. `env`
    adds to checkout_env()."""
    proc = subprocess.run([sys.executable, "-m", "llmtrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**checkout_env(), **(env or {})})
    if check and proc.returncode != 0:
        pytest.fail(f"llmtrain {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def records(run: Path, key="loss") -> list[dict]:
    """The metrics.jsonl records of a run that have `key`."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def saved_for_backward(module, forward) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `forward()` runs, leaving
    out `module`'s parameters (views of one storage count once)."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())


# Wall-clock and memory figures: they differ between two runs of the same computation.
VOLATILE = {"time", "train_s", "tokens_per_s", "mfu", "peak_mem_bytes"}  # mfu: tokens/s over a measured peak


def metrics_lines(run: Path) -> list[str]:
    """metrics.jsonl's lines, exactly as written (a torn last line left out)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return lines if not lines or lines[-1].endswith("}") else lines[:-1]


def stopped_copy(run: Path, to: Path, step: int) -> list[str]:
    """Copy the finished `run` to `to` as it would be had it stopped after `step`: its checkpoints
    after `step` removed, so that the one of `step` (a save like any other) is the newest. Returns
    the first segment, the metrics lines up to `step`, for assert_resumed_exactly."""
    shutil.copytree(run, to)
    for folder in (to / "checkpoints").glob("step*"):
        if int(folder.name.removeprefix("step")) > step:
            shutil.rmtree(folder)
    return [line for line in metrics_lines(to) if json.loads(line)["step"] <= step]


def logged(run: Path) -> dict:
    """Every record of a run keyed by (step, "train" or "eval"), less the VOLATILE figures."""
    out = {}
    for r in map(json.loads, metrics_lines(run)):
        out[r["step"], "train" if "loss" in r else "eval"] = {k: v for k, v in r.items() if k not in VOLATILE}
    return out


def assert_resumed_exactly(run: Path, straight: Path, first_segment: list[str], resume_output: str, rel: float = 0.0):
    """`run` stopped at a checkpoint of step K (`first_segment`: its metrics.jsonl lines then) and was
    resumed to the end (`resume_output`: what the resuming command printed). The resume loaded step
    K; the records of steps 1..K are the first segment's, untouched (a run that started over
    would rewrite them with new times); the resumed part logs only steps after K; and every logged
    quantity (loss, lr, tokens_seen, head metrics, val_* at every eval) equals the uninterrupted
    `straight` run's exactly (floats within `rel` where the resume changed how the sums are
    ordered, e.g. another ZeRO stage). Returns K."""
    loaded = [line for line in resume_output.splitlines() if "resuming from" in line]
    assert loaded, f"the resume said nothing of what it loaded:\n{resume_output[-2000:]}"
    k = int(loaded[-1].split("(step ")[1].split(",")[0])
    kept = [line for line in first_segment if json.loads(line)["step"] <= k]
    assert kept and json.loads(kept[-1])["step"] == k, f"the first segment did not log step {k}"
    now = metrics_lines(run)
    assert now[:len(kept)] == kept, "the first segment's records were rewritten"
    assert all(json.loads(line)["step"] > k for line in now[len(kept):]), "the resumed run logged steps up to K again"
    ours, reference = logged(run), logged(straight)
    assert ours.keys() == reference.keys()
    for key in sorted(reference):
        expected = {k: pytest.approx(v, rel=rel) if rel and isinstance(v, float) else v for k, v in reference[key].items()}
        assert ours[key] == expected, f"{key}: resumed {ours[key]} != uninterrupted {reference[key]}"
    return k


# ZeRO-3 keeps parameters under 1e5 elements whole (every weight of these tiny models), and after
# the first step keeps a small model's weights gathered (reuse distance) or fetches them ahead
# (prefetch). With all three at 0 (merged into DeepSpeed's config through the recipe's
# deepspeed.config) every weight is released after each module's forward, so a recomputation
# inside backward runs only if it gathers the block's weights again.
RELEASE_WEIGHTS = [f"deepspeed.config.zero_optimization.{key}=0" for key in
                   ("stage3_param_persistence_threshold", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size")]
CHECKPOINTING = "model.activation_checkpointing=true"


def recompute_probe(prefix: Path) -> dict:
    """The environment (for llmtrain(env=...)) under which every worker records each training-mode
    forward of a block to PREFIX.RANK (tests/recompute_probe)."""
    return {"RECOMPUTE_PROBE": str(prefix),
            "PYTHONPATH": os.pathsep.join([str(TESTS / "recompute_probe"), checkout_env()["PYTHONPATH"]])}


def assert_recomputed(run: Path, prefix: Path, steps: int, released: bool = False):
    """The run's workers (probed under recompute_probe(prefix)) ran each block forward, then again
    inside backward, last block first, at each of `steps` optimizer steps' micro-steps, with the
    block's weight whole every time; with `released` (ZeRO-3 under RELEASE_WEIGHTS) the earlier
    blocks' weights were released at each forward, so each recomputation gathered its weight again."""
    saved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert saved["model"]["activation_checkpointing"] is True
    layers, micro_steps = saved["model"]["layers"], steps * saved["train"]["grad_accum"]
    forward = [(i, False) for i in range(layers)]
    recompute = [(i, True) for i in reversed(range(layers))]  # backward reaches the last block first
    for rank in range(saved["launch"]["ranks_per_node"] * saved["launch"]["nodes"]):
        calls = [json.loads(line) for line in Path(f"{prefix}.{rank}").read_text().splitlines()]
        assert [(c["block"], c["backward"]) for c in calls] == (forward + recompute) * micro_steps, rank
        for c in calls:
            assert c["whole"][c["block"]], c  # every run of a block had its weight, recomputation included
            if released and not c["backward"]:
                assert not any(c["whole"][:c["block"]]), c


def validation_blocks(run: Path):
    """[n, seq_len + 1] the validation blocks a run's evaluation reads, as raw uint32 from its
    shards: on each rank, eval.batches micro-batches starting where the worker starts them (a
    small split is read more than once)."""
    import numpy as np
    import torch

    saved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    val = Path(json.loads((run / "data.json").read_text())["val_path"])
    stream = np.concatenate([np.fromfile(val / s["file"], dtype=np.uint32)
                             for s in json.loads((val / "shards.json").read_text())["shards"]])
    block = saved["model"]["seq_len"] + 1
    blocks = torch.from_numpy(stream[:len(stream) // block * block].astype(np.int64)).view(-1, block)
    world = saved["launch"]["ranks_per_node"] * saved["launch"]["nodes"]
    mb, n = saved["train"]["micro_batch"], len(blocks)
    starts = [((b * world + rank) * mb) % max(1, n - mb + 1) for b in range(saved["eval"]["batches"]) for rank in range(world)]
    return blocks[[i for s in starts for i in range(s, min(s + mb, n))]]


def independent_validation_metrics(run: Path, hf_folder: Path) -> dict:
    """val_loss, val_bpb and val_top1/5/10 of the run's final evaluation recomputed in float64 from
    the exported Hugging Face folder alone (transformers' Llama, not our body or head), the raw
    uint32 validation shards, and the exported tokenizer through AutoTokenizer (bytes per token by
    GPT-2's byte map): nothing of llmtrain's evaluation code."""
    import torch

    transformers = pytest.importorskip("transformers")
    from test_data import gpt2_byte_decoder

    blocks = validation_blocks(run)
    targets = blocks[:, 1:].flatten()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float64).eval()
    with torch.no_grad():
        logits = hf(blocks[:, :-1]).logits.flatten(0, 1)
    nll = -torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
    hits = logits.topk(10).indices == targets[:, None]
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    to_byte, special = gpt2_byte_decoder(), set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(targets.tolist())
    assert all(c in to_byte for t, piece in zip(targets.tolist(), pieces) if t not in special for c in piece)
    nbytes = sum(0 if t in special else len(piece) for t, piece in zip(targets.tolist(), pieces))
    out = {f"val_top{k}": hits[:, :k].any(1).sum().item() / len(targets) for k in (1, 5, 10)}
    return {"val_loss": nll / len(targets), "val_bpb": nll / (math.log(2) * nbytes), **out,
            "one_token": top_k_tolerance(blocks)}


def top_k_tolerance(blocks) -> float:
    """The share of the evaluated tokens that one token position is (blocks read n times count n
    times): float32 against float64, one near tie may rank differently."""
    import torch

    return torch.unique(blocks, dim=0, return_counts=True)[1].max().item() / blocks[:, 1:].numel()


def by_step(run: Path, key="loss") -> dict:
    """{step: value} of a run's metrics.jsonl records that have `key`."""
    return {r["step"]: r[key] for r in records(run, key)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_head_distributed(spec: dict, stage: int, steps: int = 6, ranks: int = 2, tie: bool = False,
                         bf16: bool = False) -> list[float]:
    """Per-step mean losses of a tiny model with `spec`'s head, trained under DeepSpeed ZeRO
    `stage` with `ranks` real ranks (torchrun, gloo on CPU), in fp32 or DeepSpeed's bf16 mode."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={port}", str(TESTS / "distributed_head_run.py"),
           json.dumps(spec), str(stage), str(steps)] + (["tie"] if tie else []) + (["bf16"] if bf16 else [])
    env = {**checkout_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        pytest.fail(f"distributed run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    # DeepSpeed's CPU all-reduce files in /dev/shm (~66 MB of RAM each) must not outlive the run
    leaked = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared memory left behind: {leaked}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("LOSSES "))
    return json.loads(line[len("LOSSES "):])
