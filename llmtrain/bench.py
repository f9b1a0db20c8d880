"""`llmtrain bench heads`: forward + backward time and peak extra memory of every head and of
peer implementations, side by side at one shape.

Each contender runs in a fresh subprocess (``python -m llmtrain.bench contender SPEC``) so that
one contender's allocator state, compiled kernels or crash cannot touch another's figures; the
processes take turns, one run each per round, so that load from elsewhere on a shared machine falls
on all contenders alike. All see the same seeded inputs. Time is the median of ``--repeats``
runs after ``--warmup``; memory
is the peak growth over the baseline taken once inputs and weights exist, gradients included,
in a last run of its own: on CPU the resident-set high-water mark (reset through
/proc/self/clear_refs, with glibc set to return freed blocks), on CUDA
``torch.cuda.max_memory_allocated``. The matmul rate is measured in the same run and gives the
floor: 6·N·V·D flops, the three N×V×D products of a full linear + cross-entropy (logits, ∂h, ∂W).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import typer

from llmtrain.errors import UserError, user_errors

app = typer.Typer(help="Micro-benchmarks of the output heads against peer implementations.", no_args_is_help=True,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})

PEERS = {
    "torch-eager": "F.cross_entropy on materialized fp32 logits (the reference of every ratio)",
    "torch-linear-ce": "torch F.linear_cross_entropy with LinearCrossEntropyOptions() (chunked)",
    "apple-cce": "cut_cross_entropy.linear_cross_entropy: impl=torch_compile on CPU, its kernel on CUDA",
    "apple-cce-compile": "cut_cross_entropy.linear_cross_entropy with impl=torch_compile on any device",
    "liger": "liger_kernel's LigerFusedLinearCrossEntropyLoss (Triton kernels: CUDA only)",
    "torch-adaptive": "nn.AdaptiveLogSoftmaxWithLoss, cutoffs from adaptive_cutoffs()",
}
REFERENCE = "torch-eager"
DTYPES = ("fp32", "bf16")
# For the memory run only: glibc then maps every block above this size afresh and returns it on
# free, so the RSS high-water mark sees every large temporary instead of reused heap pages. Timed
# runs keep glibc's defaults: fresh mappings page-fault on every use, which would tax contenders
# unevenly and is not what training sees.
MALLOC_MMAP_THRESHOLD = 65536
M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
RESULT_PREFIX = "BENCH-RESULT "
MATMUL_COLUMNS = 8192  # vocabulary slice the matmul rate is measured on


def adaptive_cutoffs(vocab: int) -> list[int]:
    """Cutoffs of the torch-adaptive peer, comparable to a two-level ⌈√V⌉ clustering: a
    first level of ⌈√V⌉ most frequent tokens plus one entry per tail cluster, tails growing ×4
    (V = 65,536: [256, 1024, 4096, 16384]). A tail per √V-sized cluster, as hsm has, would give
    torch's module ~√V separate D×D projections; geometric tails keep it at its intended use."""
    first = math.ceil(math.sqrt(vocab))
    cutoffs = []
    while first < vocab:
        cutoffs.append(first)
        first *= 4
    return cutoffs


# --- the worker: one contender in this (fresh) process ------------------------------------------


def _malloc_for_memory_measurement() -> None:
    """Switch glibc malloc to map-and-return for blocks above MALLOC_MMAP_THRESHOLD and release
    what the heap holds now, so that the next RSS peak counts every temporary."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the figure may under-count reused heap memory
        return
    libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    libc.malloc_trim(0)


def _inputs(tokens, vocab, hidden, dtype, device):
    """The seeded inputs every contender gets: hidden states, a [V, D] weight, Zipf-distributed
    targets (token id = frequency rank, as the adaptive softmax expects) and their unigram counts."""
    import torch

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    targets = torch.multinomial(zipf, tokens, replacement=True, generator=g)
    counts = (zipf / zipf.sum() * 1e9).round().long()
    return (h.to(device, dtype).requires_grad_(), w.to(device, dtype), targets.to(device), counts)


def _make_step(spec: dict, h, w, targets, counts) -> tuple[Callable[[], object], list]:
    """(one forward + backward, the parameters whose gradients it produces)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    name, vocab, hidden = spec["name"], spec["vocab"], spec["hidden"]
    if spec["kind"] == "head":
        from llmtrain.heads import HEADS, build_head

        head_type = spec["head_type"]
        HEADS.setdefault(head_type, spec["entry"])  # the parent's registry entry, e.g. one added by a plugin
        head = build_head({"type": head_type, **spec["options"]}, hidden_size=hidden, vocab_size=vocab)
        head.prepare(counts)
        head.to(h.device, h.dtype)
        if isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.shape == w.shape:
            with torch.no_grad():
                head.weight.copy_(w)
        return (lambda: head(h, targets).loss.backward()), list(head.parameters())
    w = w.requires_grad_()
    if name == "torch-eager":
        return (lambda: F.cross_entropy(F.linear(h, w).float(), targets).backward()), [w]
    if name == "torch-linear-ce":
        opts = nn.LinearCrossEntropyOptions()
        return (lambda: F.linear_cross_entropy(h, w, targets, options=opts).backward()), [w]
    if name in ("apple-cce", "apple-cce-compile"):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if h.device.type == "cuda" and name == "apple-cce" else "torch_compile"
        return (lambda: linear_cross_entropy(h, w, targets, impl=impl).backward()), [w]
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        return (lambda: loss(w, h, targets).backward()), [w]
    if name == "torch-adaptive":
        module = nn.AdaptiveLogSoftmaxWithLoss(hidden, vocab, adaptive_cutoffs(vocab), div_value=1.0)
        module.to(h.device, h.dtype)
        return (lambda: module(h, targets).loss.backward()), list(module.parameters())
    raise ValueError(f"unknown contender {name!r}")


def _matmul_flops(spec: dict) -> int:
    return 6 * spec["tokens"] * min(spec["vocab"], MATMUL_COLUMNS) * spec["hidden"]


def _matmul_step(spec: dict, h, w):
    """The three products of a linear + cross-entropy (logits, ∂h, ∂W) on a vocabulary slice:
    the rate they run at prices the floor."""
    import torch

    cols = min(spec["vocab"], MATMUL_COLUMNS)
    wc = w[:cols].contiguous()
    hd = h.detach()
    logits = torch.empty(hd.shape[0], cols, dtype=h.dtype, device=h.device)
    dh, dw = torch.empty_like(hd), torch.empty_like(wc)

    def step():
        torch.mm(hd, wc.T, out=logits)
        torch.mm(logits, wc, out=dh)
        torch.mm(logits.T, hd, out=dw)

    return step, _matmul_flops(spec)


class _Contender:
    """One contender set up in this process: ``run()`` does one measured forward + backward."""

    def __init__(self, spec: dict):
        import torch

        self.device = torch.device(spec["device"])
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
        self.h, w, targets, counts = _inputs(spec["tokens"], spec["vocab"], spec["hidden"], dtype, self.device)
        self.flops = None
        if spec["kind"] == "matmul":
            self.step, self.flops = _matmul_step(spec, self.h, w)
            self.params = []
        else:
            self.step, self.params = _make_step(spec, self.h, w, targets, counts)

    def _clear_grads(self) -> None:
        self.h.grad = None
        for p in self.params:
            p.grad = None

    def run(self) -> dict:
        """One timed forward + backward (gradients included: they start out unallocated)."""
        import torch

        self._clear_grads()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {"time_s": time.perf_counter() - start}

    def memory(self) -> dict:
        """One forward + backward measured for its peak memory over the level before it."""
        self._clear_grads()
        if self.device.type == "cpu":
            _malloc_for_memory_measurement()
        from llmtrain.profile.measure import PeakGrowth

        with PeakGrowth(self.device) as mem:
            self.step()
        return {"peak_bytes": mem.peak}


def _failure(e: BaseException) -> dict:
    return {"status": "failed", "note": f"{type(e).__name__}: {e}"[:500]}


def _peer_unavailable(spec: dict) -> str | None:
    """Why a peer cannot run here (its package is missing or needs another device), or None."""
    name = spec["name"]
    if name.startswith("apple-cce") and importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed"
    if name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
        if spec["device"] != "cuda":
            return "Liger's kernels need CUDA"
    return None


@app.command("contender", hidden=True)
def contender_command(spec: str = typer.Argument(..., help="JSON spec from `bench heads`")):
    """Worker: set one contender up, then measure one run per "run" line read from stdin.
    Every answer is one JSON line; a failure is an answer, not a crash."""
    spec_ = json.loads(spec)

    def say(obj):
        print(RESULT_PREFIX + json.dumps(obj), flush=True)

    skip = _peer_unavailable(spec_)
    if skip:
        return say({"status": "skipped", "note": skip})
    try:
        contender = _Contender(spec_)
    except Exception as e:
        return say(_failure(e))
    say({"status": "ready"})
    for line in sys.stdin:
        if line.strip() not in ("run", "memory"):
            break
        try:
            say({"status": "ok", **(contender.run() if line.strip() == "run" else contender.memory())})
        except Exception as e:  # reported in the table; the other contenders still run
            return say(_failure(e))


# --- the driver -----------------------------------------------------------------------------------


class _Worker:
    """A contender's process, driven one run at a time so that contenders take turns: load from
    other processes on a shared machine then falls on all of them alike."""

    def __init__(self, spec: dict, timeout: float):
        package_root = spec.get("package_root") or str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "llmtrain.bench", "contender", json.dumps(spec)]
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: chatty workers never block
        # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH; started
        # anywhere else, a --baseline worker would import whichever llmtrain sits there
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=package_root)
        self.result = {"status": "ok", "times_s": []}
        self._answer(expect="ready")

    @property
    def ok(self) -> bool:
        return self.result["status"] == "ok"

    def _answer(self, expect: str) -> dict | None:
        deadline = time.monotonic() + self.timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                self.result = {"status": "failed", "note": f"timed out after {self.timeout:.0f} s"}
                return None
            line = self.proc.stdout.readline()
            if not line:  # the worker died
                self.proc.wait()
                self.stderr.seek(0)
                tail = self.stderr.read().strip().splitlines()[-1:] or ["no output"]
                self.result = {"status": "failed", "note": f"worker exited with {self.proc.returncode}: {tail[0]}"[:500]}
                return None
            if line.startswith(RESULT_PREFIX):
                answer = json.loads(line[len(RESULT_PREFIX):])
                if answer["status"] != expect:
                    self.close()
                    self.result = answer
                    return None
                return answer

    def run(self, command: str, keep: bool = True) -> None:
        """``run`` (timed) or ``memory`` (peak measured)."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._answer(expect="ok")
        if answer and keep:
            if command == "run":
                self.result["times_s"].append(answer["time_s"])
            else:
                self.result["peak_bytes"] = answer["peak_bytes"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def measure(specs: list[dict], warmup: int, repeats: int, timeout: float, log=lambda msg: None) -> list[dict]:
    """Set every contender up in its own process, then run them in turns: ``warmup`` untimed
    rounds, ``repeats`` timed ones, and a last one that measures peak memory. Returns one result
    per spec, in order."""
    workers = []
    for spec in specs:
        log(f"setting up {spec['name']}")
        workers.append(_Worker(spec, timeout))
    for round_ in range(warmup + repeats):
        log(f"round {round_ + 1} of {warmup + repeats}" + (" (warm-up)" if round_ < warmup else ""))
        for worker in workers:
            if worker.ok:
                worker.run("run", keep=round_ >= warmup)
    log("memory round")
    for spec, worker in zip(specs, workers):
        if worker.ok and spec["kind"] != "matmul":
            worker.run("memory")
    results = []
    for spec, worker in zip(specs, workers):
        worker.close()
        r = worker.result
        if r["status"] == "ok":
            times = r.pop("times_s")
            r["times_ms"] = [t * 1e3 for t in times]
            r["time_ms"] = statistics.median(times) * 1e3
            if spec["kind"] == "matmul":
                r["gflops"] = _matmul_flops(spec) / statistics.median(times) / 1e9
            else:
                r["peak_extra_mib"] = r.pop("peak_bytes") / 2**20
        results.append(r)
    return results


def _names(value: str | None, allowed: list[str], option: str) -> list[str]:
    if value is None:
        return list(allowed)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UserError(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return names


def _head_variants(value: str | None) -> list[tuple[str, str, dict]]:
    """(label, head type, options) for each entry of --heads: a registered head, optionally
    followed by options as in a recipe's head section, e.g. ``cce:chunk_size=256:filter_eps=1e-4``
    (the syntax of `llmtrain profile --heads`; '' for none)."""
    from llmtrain.heads import HEADS
    from llmtrain.recipe import parse_head_specs

    if value is not None and not value.strip():
        return []
    specs = parse_head_specs(value) if value is not None else [(n, {"type": n}) for n in HEADS]
    return [(label, spec["type"], {k: v for k, v in spec.items() if k != "type"}) for label, spec in specs]


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


@app.command("heads")
@user_errors
def heads_command(
    tokens: int = typer.Option(4096, min=1, help="N: tokens per step"),
    vocab: int = typer.Option(65536, min=2, help="V: vocabulary size"),
    hidden: int = typer.Option(512, min=1, help="D: hidden size"),
    dtype: Literal[DTYPES] = typer.Option("fp32", help="hidden states and weights"),
    heads: str = typer.Option(None, help="comma-separated heads (default: every registered head; '' for none); "
                                         "options after the name, e.g. cce:chunk_size=256:filter_eps=1e-4"),
    peers: str = typer.Option(None, help=f"comma-separated peers (default: all of {', '.join(PEERS)}; '' for none)"),
    repeats: int = typer.Option(5, min=1, help="timed runs per contender (the median is reported)"),
    warmup: int = typer.Option(1, min=0, help="untimed runs first (compilation, allocator warm-up)"),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", help="where to run (auto: cuda when there is a GPU)"),
    timeout: float = typer.Option(1800, min=1, help="seconds a contender may take to set up or to do one run"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the figures to this JSON file ('-': to "
                                             "stdout, the table then goes to stderr)"),
    baseline: Optional[Path] = typer.Option(None, help="also run every head from the llmtrain source tree at this path "
                                            "(e.g. `git archive` of an earlier commit), labelled NAME@baseline: before "
                                            "and after side by side in one run"),
):
    """Forward + backward time and peak extra memory of each head and peer, one fresh process each.

    Examples:

    \b
      llmtrain bench heads --tokens 256 --vocab 4096 --hidden 64 --repeats 2 --heads softmax,cce --peers torch-eager
      llmtrain bench heads --tokens 256 --vocab 4096 --hidden 64 --repeats 2 --heads cce,cce:chunk_size=64 --peers '' --json -
    """
    import torch
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from llmtrain.heads import HEADS

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA device; pass --device cpu or auto")
    head_variants = _head_variants(heads)
    peer_names = _names(peers, list(PEERS), "--peers")
    if REFERENCE in peer_names:  # the reference first: every ratio divides by it
        peer_names.insert(0, peer_names.pop(peer_names.index(REFERENCE)))
    to_stdout = json_path == Path("-")
    console = Console(stderr=to_stdout, markup=False, emoji=False, highlight=False, soft_wrap=True)  # plain text: failure notes hold anything
    base = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": dtype, "device": device,
            "repeats": repeats, "warmup": warmup}

    specs = [{**base, "name": "matmul", "kind": "matmul"}] + [{**base, "name": n, "kind": "peer"} for n in peer_names]
    if baseline is not None and not (baseline / "llmtrain" / "bench.py").is_file():
        raise UserError(f"--baseline {baseline}: holds no llmtrain/bench.py; give the root of an llmtrain source tree")
    for label, head_type, options in head_variants:
        head = {**base, "name": label, "kind": "head", "head_type": head_type, "options": options,
                "entry": HEADS[head_type]}
        if baseline is not None:
            specs.append({**head, "name": f"{label}@baseline", "package_root": str(baseline.resolve())})
        specs.append(head)
    measured = measure(specs, warmup, repeats, timeout, log=lambda msg: console.print(Text(f"{msg} …", "dim")))
    results = [{"name": spec["name"], "kind": spec["kind"], **r} for spec, r in zip(specs, measured)]
    matmul, results = results[0], results[1:]

    floor_ms = None
    if matmul["status"] == "ok":
        floor_ms = 6 * tokens * vocab * hidden / (matmul["gflops"] * 1e9) * 1e3
    ref = next((r for r in results if r["name"] == REFERENCE and r["status"] == "ok"), None)
    for r in results:
        if r["status"] != "ok":
            continue
        r["time_vs_eager"] = r["time_ms"] / ref["time_ms"] if ref else None
        r["memory_vs_eager"] = r["peak_extra_mib"] / ref["peak_extra_mib"] if ref and ref["peak_extra_mib"] > 0 else None
        r["time_vs_floor"] = r["time_ms"] / floor_ms if floor_ms else None

    def fmt(x, spec):
        return "–" if x is None else format(x, spec)

    table = Table(title=f"heads: {tokens} tokens × vocab {vocab} × hidden {hidden}, {dtype}, {_device_name(device)}, "
                        f"forward + backward, median of {repeats}")
    for col in ("contender", "time ms", "× eager time", "peak extra MiB", "× eager memory", "× floor"):
        table.add_column(col, justify="left" if col == "contender" else "right", no_wrap=col == "contender")
    for r in results:
        label = Text(r["name"], "" if r["kind"] == "head" else "cyan")
        if r["status"] == "ok":
            table.add_row(label, fmt(r["time_ms"], ".1f"), fmt(r["time_vs_eager"], ".2f"), fmt(r["peak_extra_mib"], ".1f"),
                          fmt(r["memory_vs_eager"], ".3f"), fmt(r["time_vs_floor"], ".2f"))
        else:
            colour = "red" if r["status"] == "failed" else "yellow"
            table.add_row(label, Text(r["status"], colour), "", "", "", Text(r["note"], colour))
    console.print(table)
    if floor_ms:
        console.print(f"floor: 6·N·V·D = {6 * tokens * vocab * hidden / 1e9:.1f} GFLOP (logits, ∂h, ∂W) at the measured "
                      f"matmul rate {matmul['gflops']:.0f} GFLOP/s = {floor_ms:.0f} ms; heads that do less work "
                      "than N·V·D (hsm, zloss) can go below 1.")
    else:
        console.print(Text(f"matmul rate not measured: {matmul.get('note')}", "red"))

    if json_path is not None:
        doc = {"shape": {"tokens": tokens, "vocab": vocab, "hidden": hidden}, "dtype": dtype,
               "torch": torch.__version__, "device": _device_name(device), "repeats": repeats, "warmup": warmup,
               "matmul": {k: matmul.get(k) for k in ("status", "gflops", "note")} | {"floor_ms": floor_ms},
               "adaptive_cutoffs": adaptive_cutoffs(vocab), "results": results}
        if to_stdout:
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        else:
            json_path.write_text(json.dumps(doc, indent=2) + "\n")
            console.print(f"wrote {json_path}")


if __name__ == "__main__":
    app()
