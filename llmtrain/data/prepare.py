"""`prepare_data` runs once in the CLI process, before any rank starts: it streams the corpus (a scan
that hashes it, then a pass that tokenizes it in parallel processes), trains or loads the tokenizer
on a bounded sample, and writes the train/validation token streams as uint32 shards under the
cache dir. Products are cached by content hash: a second call re-reads and re-hashes the corpus and
re-checks the shards' checksums. An interrupted preparation resumes after its last whole shard.
`PreparedData` is what the workers read back from the run folder."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from llmtrain.data.cache import cache_key, sha256_file, write_json_atomic
from llmtrain.data.encode import batch_documents, default_num_proc, encode_batches
from llmtrain.data.shards import TOKEN_DTYPE, ShardWriter, TokenShards, damaged_shards, read_manifest
from llmtrain.data.sources import CorpusScan, Log, iter_documents, scan_corpus
from llmtrain.data.tokenizer import prepare_tokenizer, tokenizer_texts
from llmtrain.errors import UserError
from llmtrain.recipe import DataConfig, TokenizerConfig

# Bump when the split or shard rules change, so caches built by older code are not reused.
# 1: Arrow blocks per seq_len (until issue 14); 2: uint32 shards, any seq_len.
TOKENS_FORMAT = 2
SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """What the workers need to train on a prepared corpus; absolute paths into the cache."""

    tokenizer_path: str  # tokenizer.json
    tokenizer_hash: str  # sha256 of tokenizer.json's bytes
    vocab_size: int  # the tokenizer's actual size (may be below the recipe's for a tiny corpus)
    eos_id: int
    train_path: str  # a folder of uint32 token shards (shards.py), read as blocks of seq_len + 1
    val_path: str
    counts_path: str  # .npy int64 [vocab_size]: unigram counts over the train blocks
    n_train_blocks: int
    n_val_blocks: int
    seq_len: int
    corpus_hash: str
    n_train_tokens: int  # length of the train token stream (documents + eos) before packing

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PreparedData:
        return cls(**json.loads(text))


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, seq_len: int, *, log: Log = print) -> PreparedData:
    """Scan, tokenize and shard the corpus into the cache; cached by content hash, whatever seq_len.

    Nothing here is random (the split goes by document-name hash), so one cache serves every seed.
    Run it once before launching ranks: they only read what it wrote.
    """
    if seq_len < 1:
        raise UserError(f"model.seq_len: must be at least 1, got {seq_len}")
    t0 = time.perf_counter()
    cache = Path(data_cfg.cache_dir).expanduser().resolve()
    scan = scan_corpus(data_cfg, None if tok_cfg.path else tok_cfg.train_bytes, log)
    tokenizer_path = prepare_tokenizer(tok_cfg, tokenizer_texts(scan, data_cfg, tok_cfg.train_bytes), scan.hash,
                                       cache, log)
    tokenizer_hash = sha256_file(tokenizer_path)
    tok_meta = json.loads((tokenizer_path.parent / "meta.json").read_text())
    vocab_size, eos_id = tok_meta["vocab_size"], tok_meta["eos_id"]

    final = cache / "tokens" / cache_key(TOKENS_FORMAT, scan.hash, tokenizer_hash, data_cfg.val_fraction,
                                         data_cfg.shard_tokens)
    if (final / "meta.json").is_file():
        problems = [p for split in SPLITS for p in damaged_shards(final / split)]
        if problems:
            log(f"data: damaged shard {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + f"; deleting {final} and tokenizing again")
            shutil.rmtree(final)
        else:
            log(f"data: token shards cached at {final}")
    if not (final / "meta.json").is_file():
        tokenize_corpus(data_cfg, scan, str(tokenizer_path), eos_id, vocab_size, final, log)
    meta = json.loads((final / "meta.json").read_text())
    block = seq_len + 1
    for split, what, fix in (("train", "data.source: the train split", "more data"),
                             ("val", "data.val_fraction: the validation split", "a larger data.val_fraction")):
        if meta[f"n_{split}_tokens"] < block:
            raise UserError(f"{what} has {meta[f'n_{split}_tokens']:,} tokens, fewer than one block of model.seq_len + 1 "
                            f"= {block}; use {fix} or a smaller model.seq_len")
    log(f"data: ready in {time.perf_counter() - t0:.1f}s")
    return PreparedData(
        tokenizer_path=str(tokenizer_path), tokenizer_hash=tokenizer_hash, vocab_size=vocab_size,
        eos_id=eos_id, train_path=str(final / "train"), val_path=str(final / "val"),
        counts_path=str(block_counts(final, block, vocab_size)), n_train_blocks=meta["n_train_tokens"] // block,
        n_val_blocks=meta["n_val_tokens"] // block, seq_len=seq_len, corpus_hash=scan.hash,
        n_train_tokens=meta["n_train_tokens"],
    )


def tokenize_corpus(data_cfg: DataConfig, scan: CorpusScan, tokenizer_path: str, eos_id: int, vocab_size: int,
                    final: Path, log: Log) -> None:
    """Tokenize the corpus into `final` (train/ and val/ shard folders, meta.json, counts.npy).

    Work happens in `final`.partial, renamed to `final` when complete; progress.json there names
    the shards already closed, so an interrupted run continues after them. A lock keeps two
    processes from writing the same entry.
    """
    partial = final.with_name(final.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    with open(partial / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "meta.json").is_file():  # another process finished it while we waited
            shutil.rmtree(partial, ignore_errors=True)
            return
        t0 = time.perf_counter()
        progress_path = partial / "progress.json"
        progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
        def save_progress():
            write_json_atomic(progress_path, {s: w.state() for s, w in writers.items()})

        writers = {split: ShardWriter(partial / split, data_cfg.shard_tokens, vocab_size, progress.get(split),
                                      on_close=save_progress) for split in SPLITS}
        if progress:
            log("data: resuming an interrupted preparation after "
                + " and ".join(f"{len(w.shards)} {split} shards" for split, w in writers.items()))
        skip = {split: w.docs_done for split, w in writers.items()}

        def routed():
            seen = dict.fromkeys(SPLITS, 0)
            for doc in iter_documents(data_cfg):
                split = "val" if scan.split.is_val(doc.name) else "train"
                seen[split] += 1
                if seen[split] > skip[split]:
                    yield split, doc.text

        num_proc = data_cfg.num_proc or default_num_proc()
        for split, ids, lens in encode_batches(batch_documents(routed()), tokenizer_path, eos_id, num_proc):
            writers[split].append(ids, lens)
        manifests = {split: w.finish() for split, w in writers.items()}
        np.save(partial / "counts.npy", token_counts(partial / "train", vocab_size))
        meta = {"format": TOKENS_FORMAT, "vocab_size": vocab_size}
        for split, m in manifests.items():
            meta.update({f"n_{split}_tokens": m["n_tokens"], f"n_{split}_docs": m["n_docs"],
                         f"n_{split}_shards": len(m["shards"])})
        write_json_atomic(partial / "meta.json", meta)
        progress_path.unlink(missing_ok=True)
        os.rename(partial, final)
    log(f"data: {meta['n_train_tokens']:,} train / {meta['n_val_tokens']:,} validation tokens in "
        f"{meta['n_train_shards']} / {meta['n_val_shards']} shards, {num_proc} processes, in {time.perf_counter() - t0:.1f}s")


def token_counts(folder: Path, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: how often each id occurs in a split, read in chunks of plain memory (a
    memory map would leave every page it touched resident in this process)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in read_manifest(folder)["shards"]:
        with open(folder / shard["file"], "rb") as f:
            while (chunk := np.fromfile(f, dtype=TOKEN_DTYPE, count=1 << 22)).size:
                counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def block_counts(final: Path, block: int, vocab_size: int) -> Path:
    """counts.npy less the train tail that fills no block: the unigram counts of the train blocks."""
    path = final / f"counts-block{block}.npy"
    if not path.is_file():
        shards = TokenShards(final / "train")
        whole = len(shards) // block * block
        tail = np.bincount(np.array(shards.read(whole, len(shards)), dtype=TOKEN_DTYPE).astype(np.int64),
                           minlength=vocab_size) if whole < len(shards) else 0
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, np.load(final / "counts.npy") - tail)
        os.replace(tmp, path)
    return path
