"""`prepare_data` runs once in the CLI process, before any rank starts: it reads the corpus, trains or
loads the tokenizer, tokenizes, packs and saves train/validation blocks under the cache dir. Each
product is cached by a content hash and written atomically, so a second call only re-reads and
re-hashes the corpus. `PreparedData` is what the workers read back from the run folder."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from llmtrain.data.cache import atomic_dir, cache_key, sha256_file
from llmtrain.data.packing import pack_split
from llmtrain.data.sources import Log, read_corpus, split_documents
from llmtrain.data.tokenizer import load_tokenizer, prepare_tokenizer
from llmtrain.errors import UserError
from llmtrain.recipe import DataConfig, TokenizerConfig

# Bump when the split or packing rules change, so caches built by older code are not reused.
PACK_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """What the workers need to train on a prepared corpus; absolute paths into the cache."""

    tokenizer_path: str  # tokenizer.json
    tokenizer_hash: str  # sha256 of tokenizer.json's bytes
    vocab_size: int  # the tokenizer's actual size (may be below the recipe's for a tiny corpus)
    eos_id: int
    train_path: str  # datasets save_to_disk folder, column input_ids: int32 [seq_len + 1]
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
    """Read, tokenize, split and pack the corpus into the cache; cached by content hash.

    Nothing here is random (the split goes by document-name hash), so one cache serves every seed.
    Run it once before launching ranks: they only read what it wrote.
    """
    if seq_len < 1:
        raise UserError(f"model.seq_len: must be at least 1, got {seq_len}")
    t0 = time.perf_counter()
    cache = Path(data_cfg.cache_dir).expanduser().resolve()
    docs, corpus_hash = read_corpus(data_cfg, log)
    tokenizer_path = prepare_tokenizer(tok_cfg, docs, corpus_hash, cache, log)
    tokenizer_hash = sha256_file(tokenizer_path)
    tok_meta = json.loads((tokenizer_path.parent / "meta.json").read_text())
    vocab_size, eos_id = tok_meta["vocab_size"], tok_meta["eos_id"]

    final = cache / "packed" / cache_key(PACK_FORMAT, corpus_hash, tokenizer_hash, seq_len, data_cfg.val_fraction)
    if (final / "meta.json").is_file():
        log(f"data: packed blocks cached at {final}")
    else:
        train_docs, val_docs = split_documents(docs, data_cfg.val_fraction)
        tok = load_tokenizer(tokenizer_path)
        t1 = time.perf_counter()
        with atomic_dir(final) as tmp:
            train, n_train_tokens = pack_split(tok, train_docs, eos_id, seq_len + 1, tmp / "train")
            val, n_val_tokens = pack_split(tok, val_docs, eos_id, seq_len + 1, tmp / "val")
            for blocks, n_tokens, what, fix in (
                (train, n_train_tokens, "data.source: the train split", "more data"),
                (val, n_val_tokens, "data.val_fraction: the validation split", "a larger data.val_fraction"),
            ):
                if len(blocks) == 0:
                    raise UserError(f"{what} has {n_tokens:,} tokens, fewer than one block of model.seq_len + 1 "
                                    f"= {seq_len + 1}; use {fix} or a smaller model.seq_len")
            np.save(tmp / "counts.npy", np.bincount(train.reshape(-1), minlength=vocab_size).astype(np.int64))
            meta = {"n_train_blocks": len(train), "n_val_blocks": len(val), "n_train_tokens": n_train_tokens,
                    "n_val_tokens": n_val_tokens, "n_train_docs": len(train_docs), "n_val_docs": len(val_docs)}
            (tmp / "meta.json").write_text(json.dumps(meta))
        log(f"data: {n_train_tokens:,} train / {n_val_tokens:,} validation tokens → {len(train):,} / "
            f"{len(val):,} blocks of {seq_len + 1} in {time.perf_counter() - t1:.1f}s")
    meta = json.loads((final / "meta.json").read_text())
    log(f"data: ready in {time.perf_counter() - t0:.1f}s")
    return PreparedData(
        tokenizer_path=str(tokenizer_path), tokenizer_hash=tokenizer_hash, vocab_size=vocab_size,
        eos_id=eos_id, train_path=str(final / "train"), val_path=str(final / "val"),
        counts_path=str(final / "counts.npy"), n_train_blocks=meta["n_train_blocks"],
        n_val_blocks=meta["n_val_blocks"], seq_len=seq_len, corpus_hash=corpus_hash,
        n_train_tokens=meta["n_train_tokens"],
    )
