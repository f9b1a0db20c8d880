"""Data at scale (issue 14): peak memory of preparation and of one training rank at several corpus
sizes, and tokenization throughput against the `tokenizers` library's own `encode_batch`.

usage: python benchmarks/data_scale.py [--sizes 30e6 300e6 1500e6] [--rank-tokens 8e6 80e6 400e6] [--num-proc N]
                                       [--speed-bytes 100e6] [--repeats 3 (0: memory only)] [--work DIR]

Corpora are the stdlib's .py files repeated under distinct document names, as JSONL files of
about 64 MB, generated under --work and deleted at the end (unless --keep). Every measurement is
its own process; peak RSS is the process's high-water mark (ru_maxrss), and for preparation also
the largest of its tokenizing processes.

Memory: `prepare_data` from an empty cache, then one training rank (`python -m llmtrain.train`,
world size 1, 4 steps of a tiny model, evaluation included) on the prepared run folder. Where
tokenizing a large corpus takes too long on a loaded machine, --rank-tokens measures the rank on
train shards of that many random token ids (the last corpus's run folder, its train split
replaced): a rank's memory depends on the shards it maps, not on where their ids came from.
Speed: the same text (the first --speed-bytes of the middle corpus) through our preparation's
tokenizing pass (reading, parallel encoding, shard writing: `tokenize_corpus`) and through
`Tokenizer.encode_batch` with all cores on texts already in memory, alternated --repeats times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}

PREPARE = """
import json, resource, sys, time
from llmtrain.data import prepare
from llmtrain.recipe import DataConfig, TokenizerConfig
a = json.loads(sys.argv[1])
seconds = {}
real = prepare.tokenize_corpus
def timed(*args, **kw):
    t = time.perf_counter(); real(*args, **kw); seconds["tokenize"] = time.perf_counter() - t
prepare.tokenize_corpus = timed
dcfg = DataConfig(source=a["source"], cache_dir=a["cache"], max_bytes=a["max_bytes"], num_proc=a["num_proc"])
tcfg = TokenizerConfig(vocab_size=a["vocab"], train_bytes=a["train_bytes"])
prep = prepare.prepare_data(dcfg, tcfg, a["seq_len"], log=lambda m: print(m, file=sys.stderr))
print(json.dumps({"tokenize_s": seconds.get("tokenize"), "train_tokens": prep.n_train_tokens,
                  "self_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "workers_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "tokenizer": prep.tokenizer_path}))
"""

REFERENCE = """
import json, sys, time
from tokenizers import Tokenizer
from llmtrain.data.sources import iter_documents
from llmtrain.recipe import DataConfig
a = json.loads(sys.argv[1])
tok = Tokenizer.from_file(a["tokenizer"])
batches, batch, size = [], [], 0
for doc in iter_documents(DataConfig(source=a["source"], max_bytes=a["max_bytes"])):
    batch.append(doc.text); size += len(doc.text)
    if size >= 4 << 20:
        batches.append(batch); batch, size = [], 0
batches.append(batch)
t = time.perf_counter()
n = sum(len(e.ids) for b in batches for e in tok.encode_batch(b, add_special_tokens=False))
print(json.dumps({"encode_s": time.perf_counter() - t, "tokens": n}))
"""


def peak_of(cmd: list[str], env: dict | None = None) -> tuple[str, int]:
    """stdout of `cmd` and its peak RSS in bytes, measured in a wrapper process of its own."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(p.stderr[-3000:]) if p.returncode else None; "
               "print(p.stdout); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
               "sys.exit(p.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env or ENV)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    *body, peak = out.stdout.strip().splitlines()
    return "\n".join(body), int(peak)


def make_corpus(folder: Path, target_bytes: int) -> None:
    """JSONL files of the stdlib's texts, repeated; document names differ by file and line."""
    sys.path.insert(0, str(ROOT))
    from llmtrain.data.sources import stdlib_files

    texts = []
    for _, path in stdlib_files():
        try:
            texts.append(json.dumps({"text": path.read_bytes().decode("utf-8")}) + "\n")
        except UnicodeDecodeError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    written, part = 0, 0
    while written < target_bytes:
        with open(folder / f"part{part:04d}.jsonl", "w") as f:
            file_bytes = 0
            for line in texts:
                f.write(line)
                file_bytes += len(line)
                if written + file_bytes >= target_bytes or file_bytes >= 64 << 20:
                    break
        written, part = written + file_bytes, part + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rank_peak(corpus: Path, cache: Path, run: Path, args) -> int:
    """Peak RSS of one training rank on a prepared run folder."""
    over = [f"data.source={corpus}", f"data.cache_dir={cache}", f"tokenizer.vocab_size={args.vocab}",
            f"tokenizer.train_bytes={int(args.train_bytes)}", "model.layers=1", "model.d_model=32",
            "model.n_heads=2", f"model.seq_len={args.seq_len}", "train.steps=4", "train.micro_batch=4",
            "train.warmup_steps=1", "train.log_every=1", "eval.every=4", "eval.batches=2",
            "checkpoint.every=100", "launch.ranks_per_node=1"]
    subprocess.run([sys.executable, "-m", "llmtrain.cli", "run", str(ROOT / "recipes" / "tiny.yaml"), *over,
                    "--prepare-only", "--out", str(run)], check=True, env=ENV, capture_output=True)
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    _, peak = peak_of([sys.executable, "-m", "llmtrain.train", str(run)], env=env)
    return peak


def synthetic_rank_peak(run: Path, work: Path, n_tokens: int) -> int:
    """Peak RSS of one training rank whose train split is n_tokens random ids in shards."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from llmtrain.data.shards import ShardWriter

    data = json.loads((run / "data.json").read_text())
    shutil.copytree(run, work / "run", ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "status.yaml"))
    writer = ShardWriter(work / "train", 1 << 26, data["vocab_size"])
    rng = np.random.default_rng(0)
    for start in range(0, n_tokens, 1 << 24):
        n = min(1 << 24, n_tokens - start)
        writer.append(rng.integers(0, data["vocab_size"], n, dtype=np.uint32), np.array([n]))
    writer.finish()
    block = data["seq_len"] + 1
    data.update(train_path=str(work / "train"), n_train_tokens=n_tokens, n_train_blocks=n_tokens // block)
    (work / "run" / "data.json").write_text(json.dumps(data))
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    _, peak = peak_of([sys.executable, "-m", "llmtrain.train", str(work / "run")], env=env)
    shutil.rmtree(work, ignore_errors=True)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[30e6, 300e6, 1500e6])
    ap.add_argument("--rank-tokens", nargs="*", type=float, default=[])
    ap.add_argument("--speed-bytes", type=float, default=100e6)
    ap.add_argument("--repeats", type=int, default=3, help="speed comparisons (0: memory only)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--train-bytes", type=float, default=4e6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-proc", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtrain-data-bench"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    rows = []
    try:
        for size in args.sizes:
            corpus, cache = args.work / f"corpus-{size / 1e6:.0f}MB", args.work / f"cache-{size / 1e6:.0f}MB"
            make_corpus(corpus, int(size))
            spec = {"source": str(corpus), "cache": str(cache), "max_bytes": None, "num_proc": args.num_proc,
                    "vocab": args.vocab, "train_bytes": int(args.train_bytes), "seq_len": args.seq_len}
            out, peak = peak_of([sys.executable, "-c", PREPARE, json.dumps(spec)])
            result = json.loads(out.splitlines()[-1])
            rank = train_rank_peak(corpus, cache, args.work / f"run-{size / 1e6:.0f}MB", args)
            rows.append((size, result, peak, rank))
            print(f"{size / 1e6:,.0f} MB: prepare peak {peak / 2**20:,.0f} MiB (itself {result['self_rss'] / 2**20:,.0f}, "
                  f"tokenizing processes {result['workers_rss'] / 2**20:,.0f}), {result['train_tokens']:,} train tokens, "
                  f"tokenize {result['tokenize_s']:.1f}s; training rank peak {rank / 2**20:,.0f} MiB", flush=True)
            if size != args.sizes[len(args.sizes) // 2]:
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(corpus, ignore_errors=True)
        last_run = args.work / f"run-{args.sizes[-1] / 1e6:.0f}MB"
        for n in args.rank_tokens:
            peak = synthetic_rank_peak(last_run, args.work / f"synthetic-{n:.0f}", int(n))
            rows.append((None, None, None, peak))
            print(f"{n:,.0f} random train tokens in shards ({n * 4 / 2**30:.2f} GiB): training rank peak "
                  f"{peak / 2**20:,.0f} MiB", flush=True)
        middle = args.sizes[len(args.sizes) // 2]
        corpus = args.work / f"corpus-{middle / 1e6:.0f}MB"
        ratios = []
        cache = args.work / "speed-cache"  # one tokenizer for every repeat; the token shards go each time
        for r in range(args.repeats):
            spec = {"source": str(corpus), "cache": str(cache), "max_bytes": int(args.speed_bytes),
                    "num_proc": args.num_proc, "vocab": args.vocab, "train_bytes": int(args.train_bytes),
                    "seq_len": args.seq_len}
            ours = json.loads(peak_of([sys.executable, "-c", PREPARE, json.dumps(spec)])[0].splitlines()[-1])
            ref = json.loads(peak_of([sys.executable, "-c", REFERENCE, json.dumps({**spec, "tokenizer": ours["tokenizer"]})])[0]
                             .splitlines()[-1])
            shutil.rmtree(cache / "tokens", ignore_errors=True)
            ratios.append(ref["encode_s"] / ours["tokenize_s"])
            print(f"speed repeat {r + 1}: ours {args.speed_bytes / 1e6 / ours['tokenize_s']:.1f} MB/s "
                  f"({ours['tokenize_s']:.1f}s), encode_batch {args.speed_bytes / 1e6 / ref['encode_s']:.1f} MB/s "
                  f"({ref['encode_s']:.1f}s), ours / reference rate {ratios[-1]:.2f}", flush=True)
        if ratios:  # --repeats 0: memory only
            print(f"median rate ratio (ours / encode_batch): {statistics.median(ratios):.2f}")
        prepared = [r for r in rows if r[2] is not None]
        print(f"prepare peak, largest - smallest corpus: {(prepared[-1][2] - prepared[0][2]) / 2**20:+,.0f} MiB; "
              f"training rank, largest - smallest: {(rows[-1][3] - rows[0][3]) / 2**20:+,.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
