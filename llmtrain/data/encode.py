"""Parallel tokenization: batches of documents encoded by `num_proc` processes, results in order.

Each process runs the `tokenizers` encoder single-threaded on its batch; at most two batches per
process are in flight, so memory stays bounded however long the corpus is. With one process (or
a corpus of one batch) everything runs here, with the same function: parallel = serial, token for
token.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from typing import Iterable, Iterator

import numpy as np

# Text per batch: small enough to balance the processes, large enough to amortize the transfer.
BATCH_BYTES = 1 << 20

_tok = None
_eos = None


def _init(tokenizer_path: str, eos_id: int) -> None:
    global _tok, _eos
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    from tokenizers import Tokenizer

    _tok, _eos = Tokenizer.from_file(tokenizer_path), eos_id


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 ids of the documents, each followed by eos; int64 length of each with its eos)."""
    encodings = _tok.encode_batch_fast(texts, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    out = np.empty(int(lens.sum()), dtype=np.uint32)
    pos = 0
    for e, n in zip(encodings, lens):
        out[pos: pos + n - 1] = e.ids
        out[pos + n - 1] = _eos
        pos += n
    return out, lens


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def encode_batches(batches: Iterable[tuple[object, list[str]]], tokenizer_path: str, eos_id: int,
                   num_proc: int) -> Iterator[tuple[object, np.ndarray, np.ndarray]]:
    """(tag, ids, lengths) for each (tag, texts) batch, in input order."""
    batches = iter(batches)
    head = [b for b in (next(batches, None), next(batches, None)) if b is not None]
    if num_proc == 1 or len(head) < 2:  # a pool would cost more than it saves
        _init(tokenizer_path, eos_id)
        for tag, texts in itertools.chain(head, batches):
            yield (tag, *encode(texts))
        return
    # spawn: the caller may hold threads (tokenizers' own pool, torch) that fork would copy broken.
    with multiprocessing.get_context("spawn").Pool(num_proc, _init, (tokenizer_path, eos_id)) as pool:
        pending: collections.deque = collections.deque()
        for tag, texts in itertools.chain(head, batches):
            pending.append((tag, pool.apply_async(encode, (texts,))))
            if len(pending) >= 2 * num_proc:
                tag, result = pending.popleft()
                yield (tag, *result.get())
        while pending:
            tag, result = pending.popleft()
            yield (tag, *result.get())


def batch_documents(tagged_texts: Iterable[tuple[object, str]]) -> Iterator[tuple[object, list[str]]]:
    """Group (tag, text) pairs into (tag, texts) batches of about BATCH_BYTES, one tag per batch,
    keeping the order of texts within each tag."""
    open_batches: dict[object, tuple[list[str], list[int]]] = {}
    for tag, text in tagged_texts:
        texts, size = open_batches.setdefault(tag, ([], [0]))
        texts.append(text)
        size[0] += len(text)
        if size[0] >= BATCH_BYTES:
            yield tag, texts
            del open_batches[tag]
    for tag, (texts, _) in open_batches.items():
        yield tag, texts
