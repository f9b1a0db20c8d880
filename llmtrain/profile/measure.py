"""Memory measured on this device, for `llmtrain profile`, and the CUDA out-of-memory snapshot.

Every measurement runs in a fresh subprocess (`python -m llmtrain.profile.measure JOBS_JSON`), so
that no allocator state, library workspace or earlier tensor leaks into the figure.
  CUDA  peak growth of torch.cuda.max_memory_allocated over the bytes allocated before the step
        ("cuda-max-allocated"); with a snapshot path, the allocator history of that step is
        dumped for PyTorch's memory_viz (https://pytorch.org/memory_viz).
  CPU   the figure ("cpu-live-tensors") is MemTracker's peak of live tensor bytes, counted at
        dispatch as the CUDA allocator would count them. Beside it, "peak_rss_bytes": the growth
        of the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs), with
        glibc returning every block above 64 KiB to the system on free (MALLOC_MMAP_THRESHOLD_).
        The two agree within a few percent for most heads; RSS also sees what no GPU would hold
        (oneDNN scratch, mixed-dtype casts inside CPU kernels) and misses pages of an empty tensor
        not yet written.
Each job runs its step once to warm up (lazy library state, thread pools), then measures it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from llmtrain.train.memory import SNAPSHOT_ENTRIES

RESULT_PREFIX = "LLMTRAIN-MEASURE "
MALLOC_MMAP_THRESHOLD = 65536


def measure(jobs: list[dict[str, Any]], timeout: float = 600) -> list[dict[str, Any]]:
    """Run `jobs` in one fresh subprocess, in order; one result dict per job. A job that fails
    comes back as {"error": message}, one whose estimate ("need") exceeds the free memory as
    {"skipped": message}, instead of raising. Without CUDA the free memory is known here, and a
    process is started only for jobs that fit; with CUDA the child checks (this process never
    touches the GPU)."""
    import torch

    free = None if torch.cuda.is_available() else free_device_bytes(torch.device("cpu"))
    results: list[dict[str, Any] | None] = [
        None if free is None or job.get("need", 0) <= free else _skipped(job["need"], free) for job in jobs]
    pending = [job for job, result in zip(jobs, results) if result is None]
    done = iter(_run_child(pending, timeout) if pending else [])
    return [result if result is not None else next(done) for result in results]


def _run_child(jobs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    return _run_child_args([json.dumps(jobs)], len(jobs), timeout)


def _run_child_args(args: list[str], expected: int, timeout: float) -> list[dict[str, Any]]:
    # The child imports the same llmtrain as this process, wherever that was imported from.
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD), "PYTHONPATH": path}
    env.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "llmtrain.profile.measure", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"error": f"measurement did not finish in {timeout:.0f} s"} for _ in range(expected)]
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if len(results) < expected:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        reason = f"the measuring process ended early: {tail[0]}"
        results += [{"error": reason} for _ in range(expected - len(results))]
    return results


@functools.lru_cache(maxsize=8)
def runtime_bytes(hf: str | None = None, timeout: float = 120) -> int | None:
    """Resident bytes of a training rank's code: the interpreter, torch (with torch._dynamo, which
    DeepSpeed's engine loads), DeepSpeed and llmtrain imported, and a Hugging Face body's modeling
    code, measured in a fresh process. A CPU rank's resident set carries them beside the tensors the estimate counts;
    a GPU allocator's figure does not. None when the measuring process fails."""
    result = _run_child_args(["--runtime", *([hf] if hf else [])], 1, timeout)[0]
    return result.get("bytes")


def free_device_bytes(device) -> int:
    """What a measurement may use: most of the free CUDA memory, or of the available RAM."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info()[0] * 0.9)
    import psutil

    return int(psutil.virtual_memory().available * 0.7)


def _skipped(need: int, free: int) -> dict[str, str]:
    from llmtrain.train.memory import format_bytes

    return {"skipped": f"the estimate ({format_bytes(need)}) exceeds this device's free memory ({format_bytes(free)})"}


# ----------------------------------------------------------------------------- in the subprocess


class PeakGrowth:
    """Peak bytes allocated inside the block, over the level at its start."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        from llmtrain.train.memory import reset_cpu_peak, resident_bytes

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resident_bytes()
            if not reset_cpu_peak():
                raise RuntimeError("cannot reset the resident-set high-water mark (/proc/self/clear_refs)")
        return self

    def __exit__(self, *exc):
        import torch

        from llmtrain.train.memory import peak_bytes

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = peak_bytes() - self.base


def tracked_tensor_peak(step, *external) -> int:
    """MemTracker's peak of live tensor bytes during `step()`, over the bytes live at its start."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*external)
    with tracker:
        start = sum(s["Total"] for s in tracker.get_tracker_snapshot("current").values())
        step()
    return sum(s["Total"] for s in tracker.get_tracker_snapshot("peak").values()) - start


@contextlib.contextmanager
def cuda_history(path: str | None) -> Iterator[None]:
    """Record the CUDA allocator's history inside the block and dump it to `path` (a pickle that
    PyTorch's memory_viz opens). No-op without a path or without CUDA."""
    import torch

    if not path or not torch.cuda.is_available():
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
    try:
        yield
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def zipf_counts(vocab: int):
    """Unigram counts with a Zipf law (token id = frequency rank), for heads that need them."""
    import torch

    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return (zipf / zipf.sum() * 1e9).round().long() + 1


def _head_job(job: dict, device) -> dict:
    """Forward + backward of one head at one shape: the peak over its inputs and weights (weight
    gradients and ∂hidden included, as the estimate's head_total counts them)."""
    import torch

    from llmtrain.heads import build_head
    from llmtrain.profile.estimate import PRECISION_DTYPES

    dtype = PRECISION_DTYPES[job["dtype"]]
    tokens, vocab, hidden = job["tokens"], job["vocab"], job["hidden"]
    torch.manual_seed(0)
    counts = zipf_counts(vocab)
    head = build_head(job["head"], hidden_size=hidden, vocab_size=vocab)
    head.prepare(counts)
    head.to(device, dtype)
    h = torch.randn(tokens, hidden, dtype=dtype, device=device).requires_grad_()
    targets = torch.multinomial(counts.double(), tokens, replacement=True).to(device)

    def step():
        head(h, targets).loss.backward()

    def clear():
        h.grad = None
        head.zero_grad(set_to_none=True)

    return _measure_step(step, clear, device, job.get("snapshot"), (head, h, targets))


def _step_job(job: dict, device) -> dict:
    """One full training step of a recipe's model in one process: body + head forward/backward and
    an AdamW update, after a first step that creates the optimizer states. bf16 keeps fp32 master
    weights and fp32 gradients beside the bf16 model, as DeepSpeed's bf16 mode does; with
    model.activation_checkpointing each decoder layer is recomputed in backward. One rank, no
    ZeRO partitioning: compare it with the estimate at world size 1, stage 0."""
    import torch

    from llmtrain.model.language_model import LanguageModel
    from llmtrain.recipe import Recipe
    from llmtrain.train.engine_config import param_groups

    recipe = Recipe.model_validate(job["recipe"])
    t, cfg = recipe.train, recipe.model
    bf16 = t.precision == "bf16"
    torch.manual_seed(t.seed)
    counts = zipf_counts(job["vocab"])
    ids = torch.multinomial(counts.double(), t.micro_batch * (cfg.seq_len + 1), replacement=True)
    ids = ids.view(t.micro_batch, cfg.seq_len + 1).to(device)
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    model = LanguageModel(cfg, recipe.head_spec(), job["vocab"])
    if cfg.activation_checkpointing:
        _checkpoint_layers(model)
    model.head.prepare(counts)
    model.to(device, torch.bfloat16 if bf16 else torch.float32)
    groups = param_groups(model, t.weight_decay)
    pairs = [(p.detach().float() if bf16 else p, p) for g in groups for p in g["params"]]
    master = {id(p): m for m, p in pairs}
    groups = [{**g, "params": [master[id(p)] for p in g["params"]]} for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, foreach=False)

    def step():
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        if bf16:
            for m, p in pairs:
                m.grad, p.grad = p.grad.float(), None
        optimizer.step()
        if bf16:
            with torch.no_grad():
                for m, p in pairs:
                    p.copy_(m)
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)

    step()
    gc.collect()
    # What stays between steps: the model, master weights and optimizer states. On CPU their
    # tensors' bytes, because the resident set also grows by the process's one-time costs of a
    # first step (the optimizer's first use loads torch._dynamo and triton, ~150 MB).
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated() - base
    else:
        resident = _storage_bytes(list(model.parameters()) + list(model.buffers()) + [m for m, _ in pairs]
                                  + [v for state in optimizer.state.values() for v in state.values()])
    tracked = (model, optimizer, ids, *(m for m, p in pairs if m is not p))
    result = _measure_step(step, lambda: None, device, job.get("snapshot"), tracked, warm=False)
    result["step_growth"] = result["bytes"]
    result["bytes"] += resident
    if "peak_rss_bytes" in result:
        result["peak_rss_bytes"] += resident
    return result


def _checkpoint_layers(model) -> None:
    """Recompute each decoder layer in backward, as model.activation_checkpointing trains: the
    body's own switch where it has one, else torch.utils.checkpoint around each block here."""
    from torch.utils.checkpoint import checkpoint

    inner = model.body.model if hasattr(model.body, "model") else None  # a Hugging Face base model
    if inner is not None:
        if not any(getattr(m, "gradient_checkpointing", False) for m in inner.modules()):
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5; 4.x has the old name only
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    if getattr(model.body, "activation_checkpointing", False):
        return
    for block in model.body.blocks:
        forward = block.forward
        block.forward = lambda *args, forward=forward: checkpoint(forward, *args, use_reentrant=False)


def _storage_bytes(tensors) -> int:
    import torch

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    return sum(storages.values())


def _measure_step(step, clear, device, snapshot, tracked, warm: bool = True) -> dict:
    if warm:
        step()
        clear()
    with cuda_history(snapshot), PeakGrowth(device) as meter:
        step()
    clear()
    if device.type == "cuda":
        result = {"bytes": meter.peak, "method": "cuda-max-allocated", "device": "cuda"}
        if snapshot:
            result["snapshot"] = str(snapshot)
        return result
    result = {"bytes": tracked_tensor_peak(step, *tracked), "method": "cpu-live-tensors", "device": "cpu",
              "peak_rss_bytes": meter.peak}
    clear()
    return result


def _runtime(hf: str | None) -> dict:
    from llmtrain.profile.estimate import _quiet_deepspeed_import
    from llmtrain.train.memory import resident_bytes

    with _quiet_deepspeed_import():
        # what a rank has loaded by its first optimizer step: DeepSpeed's engine brings in
        # torch._dynamo (~140 MiB), which a Hugging Face body's transformers has loaded already
        for module in ("deepspeed", "llmtrain.train.worker", "torch._dynamo"):
            importlib.import_module(module)
    if hf:
        from llmtrain.model.hf import empty_causal_lm, read_hf_folder

        empty_causal_lm(read_hf_folder(hf).config)
    _one_small_training_step()
    gc.collect()
    return {"bytes": resident_bytes(), "method": "VmRSS after a training rank's imports and one small training step"}


def _one_small_training_step() -> None:
    """Forward, backward and an AdamW step of a two-layer model of ours: a rank's resident set holds
    the code pages and per-thread allocator arenas its kernels touch, which importing alone does not
    (388 → 408 MiB here; BENCHMARKS.md, issue 19 item 5)."""
    import torch

    from llmtrain.model.language_model import LanguageModel
    from llmtrain.recipe import ModelConfig

    model = LanguageModel(ModelConfig(layers=2, d_model=64, n_heads=2, seq_len=32), {"type": "softmax"}, 512)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 512, (2, 33))
    for _ in range(2):
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main(argv: list[str]) -> int:
    import torch

    if argv[:1] == ["--runtime"]:
        print(RESULT_PREFIX + json.dumps(_runtime(argv[1] if len(argv) > 1 else None)), flush=True)
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for job in json.loads(argv[0]):
        free = free_device_bytes(device)
        if job.get("need", 0) > free:
            result = _skipped(job["need"], free)
        else:
            try:
                result = (_head_job if job["kind"] == "head" else _step_job)(job, device)
            except Exception as e:  # a failed job is a result, so the others still run
                result = {"error": f"{type(e).__name__}: {e}"}
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
