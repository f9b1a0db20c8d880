"""Data: corpus sources, the tokenizer, packed blocks and the resumable sampler.

`prepare_data` runs once in the CLI process, before any rank starts: it reads the corpus, trains or
loads the tokenizer, tokenizes, packs and saves train/validation blocks under the cache dir. Each
product is cached by a content hash and written atomically, so a second call only re-reads and
re-hashes the corpus. Workers open the blocks with `load_split` and walk them with
`ResumableSampler`, whose position is part of the resume state.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch

from llmtrain.errors import UserError
from llmtrain.recipe import DataConfig, TokenizerConfig

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers, tried in order when loading one.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
SUFFIXES = (".txt", ".py", ".jsonl", ".parquet")
SUFFIX_LIST = "/".join(SUFFIXES)
# Bump when the reading, split or packing rules change, so caches built by older code are not reused.
TOKENIZER_FORMAT = 1
PACK_FORMAT = 1
# Text per encode_batch call: bounds the memory held by Encoding objects at once.
ENCODE_CHUNK_BYTES = 4 << 20

Log = Callable[[str], None]


class Document(NamedTuple):
    name: str  # stable identity (relative path, path:line, path:row, index): its hash decides the split
    text: str


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


# ---------------------------------------------------------------- corpus sources


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative name, path) of every .py file of the running Python's standard library, sorted,
    without site-packages/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted((p.relative_to(root).as_posix(), p) for p in found)


def _text_file_documents(files: Iterable[tuple[str, Path]], skipped: list[str]) -> Iterator[Document]:
    for name, path in files:
        try:
            yield Document(name, path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append(name)


def _local_files(source: str) -> list[tuple[str, Path]]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise UserError(f"data.source: no {SUFFIX_LIST} files under {source!r}")
        return sorted((p.relative_to(path).as_posix(), p) for p in files)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"data.source: {source!r} is not a {SUFFIX_LIST} file")
        return [(path.name, path)]
    if any(c in source for c in "*?["):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(source), recursive=True))
        files = [(p.as_posix(), p) for p in matches if p.suffix in SUFFIXES and p.is_file()]
        if not files:
            raise UserError(f"data.source: no {SUFFIX_LIST} files match {source!r}")
        return files
    raise UserError(
        f"data.source: {source!r} does not exist; use 'stdlib', 'hf:NAME', or a path, glob or "
        f"directory of {SUFFIX_LIST} files"
    )


def _jsonl_documents(name: str, path: Path, field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"data.source: {path}:{lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"data.text_field: {path}:{lineno} has no {field!r} field (found {keys})")
                text = record[field]
                if not isinstance(text, str):
                    raise UserError(f"data.text_field: {path}:{lineno} field {field!r} holds "
                                    f"{type(text).__name__}, not text")
                yield Document(f"{name}:{lineno}", text)
        except UnicodeDecodeError as e:
            raise UserError(f"data.source: {path} is not UTF-8 ({e.reason})") from None


def _parquet_documents(name: str, path: Path, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq  # comes with datasets

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise UserError(f"data.source: cannot read {path} as Parquet ({e})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"data.text_field: {path} has no column {field!r} (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield Document(f"{name}:{row}", text)
            row += 1


def _local_documents(cfg: DataConfig, skipped: list[str]) -> Iterator[Document]:
    for name, path in _local_files(cfg.source):
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(name, path, cfg.text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(name, path, cfg.text_field)
        else:
            yield from _text_file_documents([(name, path)], skipped)


def _hf_documents(cfg: DataConfig) -> Iterator[Document]:
    import datasets

    name = cfg.source.removeprefix("hf:")
    where = f"Hugging Face dataset {name!r} (config {cfg.hf_config!r}, split {cfg.hf_split!r})"
    if not name:
        raise UserError("data.source: 'hf:' needs a dataset name, e.g. 'hf:roneneldan/TinyStories'")
    try:
        # Streaming when capped: reading a prefix should not download the whole dataset.
        ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=cfg.max_bytes is not None)
        for i, record in enumerate(ds):
            if cfg.text_field not in record:
                raise UserError(f"data.text_field: {where} has no column {cfg.text_field!r} "
                                f"(columns: {sorted(record)})")
            if isinstance(record[cfg.text_field], str):
                yield Document(str(i), record[cfg.text_field])
    except UserError:
        raise
    except Exception as e:  # the hub, the network and dataset scripts raise many kinds
        raise UserError(f"data.source: could not load {where}: {type(e).__name__}: {e}") from e


def _cap_bytes(docs: Iterable[Document], max_bytes: int | None) -> Iterator[tuple[Document, int]]:
    """(document, its UTF-8 size), stopping at max_bytes; the last document is cut to fit."""
    total = 0
    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            cut = doc.text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            if cut:
                yield Document(doc.name, cut), len(cut.encode("utf-8"))
            return
        total += size
        yield doc, size


def read_corpus(cfg: DataConfig, log: Log = print) -> tuple[list[Document], str]:
    """The corpus's non-empty documents in source order, and a sha256 over their names and texts."""
    if not cfg.text_field:
        raise UserError("data.text_field: must name the column holding the text, e.g. 'text'")
    t0 = time.perf_counter()
    skipped: list[str] = []
    if cfg.source == "stdlib":
        docs = _text_file_documents(stdlib_files(), skipped)
    elif cfg.source.startswith("hf:"):
        docs = _hf_documents(cfg)
    else:
        docs = _local_documents(cfg, skipped)
    digest = hashlib.sha256()
    corpus, n_bytes = [], 0
    for doc, size in _cap_bytes(docs, cfg.max_bytes):
        if not doc.text:
            continue
        name = doc.name.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name + size.to_bytes(8, "little"))
        digest.update(doc.text.encode("utf-8"))
        corpus.append(doc)
        n_bytes += size
    if not corpus:
        raise UserError(f"data.source: no documents with text found in {cfg.source!r}"
                        + (f" ({len(skipped)} files were not UTF-8)" if skipped else ""))
    log(f"data: {len(corpus):,} documents, {n_bytes / 1e6:.1f} MB of text from {cfg.source!r}"
        + (f" (skipped {len(skipped)} non-UTF-8 files)" if skipped else "")
        + f" in {time.perf_counter() - t0:.1f}s")
    return corpus, digest.hexdigest()


# ---------------------------------------------------------------- split


def _unit_hash(name: str) -> float:
    """A uniform number in [0, 1) fixed by the document's name: stable across runs and seeds."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) by the hash of each document's name; at least one document on each side."""
    if len(docs) < 2:
        raise UserError(
            "data.source: found a single document, but the train/validation split is by whole "
            "documents; use several files, or JSONL with one document per line"
        )
    u = [_unit_hash(d.name) for d in docs]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):  # a small corpus can miss a small fraction: hold out the lowest hash
        is_val[int(np.argmin(u))] = True
    if all(is_val):
        is_val[int(np.argmax(u))] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


# ---------------------------------------------------------------- tokenizer


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`, renamed to `final` only when the block completes, so
    an interrupted write never leaves a directory that later counts as done."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # else another process finished the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer of `vocab_size` tokens, the last being EOS_TOKEN (fewer when the
    text has too few distinct pairs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # room for the eos token appended below
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _tokenizer_sample(docs: list[Document], train_bytes: int | None) -> Iterator[str]:
    """Texts for tokenizer training: in name-hash order, so a byte cap still spreads over the
    whole corpus instead of its alphabetical head."""
    ordered = sorted(docs, key=lambda d: _unit_hash(d.name)) if train_bytes else docs
    return (doc.text for doc, _ in _cap_bytes(ordered, train_bytes))


def _load_user_tokenizer(tok_cfg: TokenizerConfig):
    from tokenizers import Tokenizer

    path = Path(tok_cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"tokenizer.path: {tok_cfg.path!r} does not exist (expected a tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"tokenizer.path: cannot read {tok_cfg.path!r} as a tokenizers "
                        f"tokenizer.json: {e}") from None
    if not any(tok.token_to_id(t) is not None for t in KNOWN_EOS_TOKENS):
        tok.add_special_tokens([EOS_TOKEN])
    if tok.get_vocab_size() > tok_cfg.vocab_size:
        raise UserError(
            f"tokenizer.vocab_size: {tok_cfg.vocab_size} is smaller than the tokenizer at "
            f"tokenizer.path ({tok.get_vocab_size()} tokens with its end-of-document token); "
            f"set tokenizer.vocab_size to at least {tok.get_vocab_size()}"
        )
    return tok


def prepare_tokenizer(tok_cfg: TokenizerConfig, docs: list[Document], corpus_hash: str, cache: Path,
                      log: Log = print) -> Path:
    """tokenizer.json in the cache (trained, or a copy of tokenizer.path with an eos ensured)."""
    import tokenizers

    if tok_cfg.path:
        path = Path(tok_cfg.path).expanduser()
        source = _sha256_file(path) if path.is_file() else None
        key = _key(TOKENIZER_FORMAT, tokenizers.__version__, "file", source, tok_cfg.vocab_size)
    else:
        key = _key(TOKENIZER_FORMAT, tokenizers.__version__, "bpe", corpus_hash, tok_cfg.vocab_size,
                   tok_cfg.min_frequency, tok_cfg.train_bytes)
    final = cache / "tokenizer" / key
    if (final / "tokenizer.json").is_file():
        log(f"data: tokenizer cached at {final}")
        return final / "tokenizer.json"
    t0 = time.perf_counter()
    if tok_cfg.path:
        tok = _load_user_tokenizer(tok_cfg)
    else:
        tok = train_tokenizer(_tokenizer_sample(docs, tok_cfg.train_bytes), tok_cfg.vocab_size,
                              tok_cfg.min_frequency)
    eos = next(t for t in KNOWN_EOS_TOKENS if tok.token_to_id(t) is not None)
    with _atomic_dir(final) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        meta = {"vocab_size": tok.get_vocab_size(), "eos_token": eos, "eos_id": tok.token_to_id(eos)}
        (tmp / "meta.json").write_text(json.dumps(meta))
    short = "" if tok_cfg.path or tok.get_vocab_size() == tok_cfg.vocab_size else (
        f"; fewer than tokenizer.vocab_size = {tok_cfg.vocab_size:,}: the text has too few pairs seen "
        f"{tok_cfg.min_frequency}+ times, so raise tokenizer.train_bytes or use more data")
    log(f"data: tokenizer {'loaded' if tok_cfg.path else 'trained'} ({tok.get_vocab_size():,} tokens{short}) "
        f"in {time.perf_counter() - t0:.1f}s")
    return final / "tokenizer.json"


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def token_bytes(tokenizer_path: str | Path) -> torch.Tensor:
    """[V] int64: how many UTF-8 bytes of text each token id stands for (special tokens 0), for
    bits per byte = Σ nll / (ln 2 · Σ bytes[target]).

    Exact for byte-level tokenizers (each character of a token is one byte). For other models it
    falls back to the length of the decoded token, with <0xNN> byte-fallback tokens counted as 1.
    """
    from tokenizers import pre_tokenizers

    tok = load_tokenizer(tokenizer_path)
    spec = json.loads(tok.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters that stand for bytes
    out = [0] * tok.get_vocab_size()
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if byte_level and all(c in alphabet for c in token):
            out[i] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(tok.decode([i]).encode("utf-8"))
    for i, added in tok.get_added_tokens_decoder().items():
        out[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return torch.tensor(out, dtype=torch.int64)


# ---------------------------------------------------------------- packing


def token_stream(tok, docs: list[Document], eos_id: int) -> np.ndarray:
    """int32 ids of the documents in order, each followed by eos."""
    eos = np.array([eos_id], dtype=np.int32)
    pieces: list[np.ndarray] = []
    batch: list[str] = []
    batch_bytes = 0

    def flush() -> None:
        for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
            pieces.extend((np.asarray(enc.ids, dtype=np.int32), eos))
        batch.clear()

    for doc in docs:
        batch.append(doc.text)
        batch_bytes += len(doc.text)
        if batch_bytes >= ENCODE_CHUNK_BYTES:
            flush()
            batch_bytes = 0
    if batch:
        flush()
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def pack_blocks(stream: np.ndarray, block_len: int) -> np.ndarray:
    """[n, block_len] non-overlapping blocks of the stream; the tail that fills no block is dropped."""
    n = len(stream) // block_len
    return stream[: n * block_len].reshape(n, block_len)


def save_blocks(blocks: np.ndarray, path: Path) -> None:
    """Save int32 blocks as a datasets (Arrow) folder with one fixed-length column, input_ids."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    flat = pa.array(np.ascontiguousarray(blocks, dtype=np.int32).reshape(-1))
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, blocks.shape[1])})
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset(InMemoryTable(table)).save_to_disk(str(path))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def load_split(path: str | Path) -> torch.Tensor:
    """[n_blocks, seq_len + 1] int64 blocks of a saved split; block b gives inputs blocks[b, :-1]
    and targets blocks[b, 1:]."""
    import datasets
    import pyarrow as pa

    column = datasets.load_from_disk(str(path)).data.table.column("input_ids")
    if not pa.types.is_fixed_size_list(column.type) or column.type.value_type != pa.int32():
        raise UserError(f"data: {path} does not hold packed int32 blocks (found {column.type}); "
                        "delete it so prepare_data rebuilds it")
    width = column.type.list_size
    flat = [chunk.flatten().to_numpy() for chunk in column.chunks]
    ids = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    return torch.from_numpy(ids.astype(np.int64).reshape(-1, width))


def _pack_split(tok, docs: list[Document], eos_id: int, block_len: int, path: Path) -> tuple[np.ndarray, int]:
    stream = token_stream(tok, docs, eos_id)
    blocks = pack_blocks(stream, block_len)
    save_blocks(blocks, path)
    return blocks, len(stream)


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
    tokenizer_hash = _sha256_file(tokenizer_path)
    tok_meta = json.loads((tokenizer_path.parent / "meta.json").read_text())
    vocab_size, eos_id = tok_meta["vocab_size"], tok_meta["eos_id"]

    final = cache / "packed" / _key(PACK_FORMAT, corpus_hash, tokenizer_hash, seq_len, data_cfg.val_fraction)
    if (final / "meta.json").is_file():
        log(f"data: packed blocks cached at {final}")
    else:
        train_docs, val_docs = split_documents(docs, data_cfg.val_fraction)
        tok = load_tokenizer(tokenizer_path)
        t1 = time.perf_counter()
        with _atomic_dir(final) as tmp:
            train, n_train_tokens = _pack_split(tok, train_docs, eos_id, seq_len + 1, tmp / "train")
            val, n_val_tokens = _pack_split(tok, val_docs, eos_id, seq_len + 1, tmp / "val")
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


# ---------------------------------------------------------------- sampler


class ResumableSampler:
    """Each epoch walks one global permutation of all blocks (seeded by seed + epoch); a global
    micro-step takes the next world_size × micro_batch blocks and rank r gets the r-th slice.

    The state {epoch, offset} counts GLOBAL blocks, so it does not depend on the world size: a run
    resumed on another world size (same global batch) continues at the same place in the data. An
    epoch ends when fewer than one global batch of blocks is left; those wait for a later epoch's
    permutation.
    """

    def __init__(self, n_blocks: int, micro_batch: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch < 1:
            raise UserError(f"train.micro_batch: must be at least 1, got {micro_batch}")
        if micro_batch * world_size > n_blocks:
            raise UserError(f"train.micro_batch: {micro_batch} × {world_size} ranks needs {micro_batch * world_size} "
                            f"blocks per step, but the data has only {n_blocks}; use more data or a smaller batch")
        self.n_blocks, self.micro_batch, self.rank, self.world_size, self.seed = (
            n_blocks, micro_batch, rank, world_size, seed)
        self.epoch = 0
        self.offset = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n_blocks, generator=g))
        return self._perm[1]

    def next_indices(self) -> list[int]:
        """This rank's block indices for the next micro-step."""
        global_batch = self.micro_batch * self.world_size
        if self.offset + global_batch > self.n_blocks:
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.micro_batch
        self.offset += global_batch
        return self.permutation(self.epoch)[start : start + self.micro_batch].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n_blocks": self.n_blocks}

    def load_state_dict(self, state: dict) -> None:
        if state["n_blocks"] != self.n_blocks:
            raise UserError(f"resume: the checkpoint's data had {state['n_blocks']} training blocks, this "
                            f"data has {self.n_blocks}; resume with the data the run started with")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
