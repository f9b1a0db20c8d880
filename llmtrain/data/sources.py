"""Corpus sources: the documents of a recipe's `data.source`, streamed one at a time (never all
held), a scan that hashes them, and the train/validation split by document-name hash."""

from __future__ import annotations

import glob
import hashlib
import heapq
import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from llmtrain.errors import UserError
from llmtrain.recipe import DataConfig

SUFFIXES = (".txt", ".py", ".jsonl", ".parquet")
SUFFIX_LIST = "/".join(SUFFIXES)

Log = Callable[[str], None]


class Document(NamedTuple):
    name: str  # stable identity (relative path, path:line, path:row, index): its hash decides the split
    text: str


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative name, path) of every .py file of the running Python's standard library, sorted,
    without site-packages/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted((p.relative_to(root).as_posix(), p) for p in found)


class Skipped:
    """Non-UTF-8 documents passed over while reading: how many, and the first one's name."""

    def __init__(self):
        self.count, self.first = 0, None

    def add(self, name: str) -> None:
        self.count += 1
        self.first = self.first or name

    def __str__(self) -> str:
        return f"skipped {self.count} non-UTF-8 document{'s' if self.count > 1 else ''}, the first {self.first}"


def _text_file_documents(files: Iterable[tuple[str, Path]], skipped: Skipped) -> Iterator[Document]:
    for name, path in files:
        try:
            yield Document(name, path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            skipped.add(name)


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


def _jsonl_documents(name: str, path: Path, field: str, skipped: Skipped) -> Iterator[Document]:
    # Bytes line by line: a non-UTF-8 line is skipped by itself, and errors name their line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.add(f"{path}:{lineno}")
                continue
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


def _local_documents(cfg: DataConfig, skipped: Skipped) -> Iterator[Document]:
    for name, path in _local_files(cfg.source):
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(name, path, cfg.text_field, skipped)
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
        # Always streaming: records arrive as they are read, whatever the dataset's size.
        ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
        for i, record in enumerate(ds):
            if cfg.text_field not in record:
                raise UserError(f"data.text_field: {where} record {i} has no column {cfg.text_field!r} "
                                f"(columns: {sorted(record)})")
            if isinstance(record[cfg.text_field], str):
                yield Document(str(i), record[cfg.text_field])
    except UserError:
        raise
    except Exception as e:  # the hub, the network and dataset scripts raise many kinds
        raise UserError(f"data.source: could not load {where}: {type(e).__name__}: {e}") from e


def cap_bytes(docs: Iterable[Document], max_bytes: int | None) -> Iterator[tuple[Document, int]]:
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


def iter_documents(cfg: DataConfig, skipped: Skipped | None = None) -> Iterator[Document]:
    """The corpus's non-empty documents in source order, read one at a time (capped at
    data.max_bytes); each call reads the source again from its start."""
    if not cfg.text_field:
        raise UserError("data.text_field: must name the column holding the text, e.g. 'text'")
    skipped = skipped if skipped is not None else Skipped()
    if cfg.source == "stdlib":
        docs = _text_file_documents(stdlib_files(), skipped)
    elif cfg.source.startswith("hf:"):
        docs = _hf_documents(cfg)
    else:
        docs = _local_documents(cfg, skipped)
    return (doc for doc, _ in cap_bytes(docs, cfg.max_bytes) if doc.text)


class CorpusScan(NamedTuple):
    hash: str  # sha256 over the documents' names and texts: the cache key of everything derived
    n_docs: int
    n_bytes: int
    sample: list[Document] | None  # the tokenizer's training sample, when bounded (sample_bytes)
    split: ValidationRule  # which documents are held out


def scan_corpus(cfg: DataConfig, sample_bytes: int | None = None, log: Log = print) -> CorpusScan:
    """One streaming pass: the content hash, the size, and the documents of lowest name hash up
    to sample_bytes (so a bounded sample still spreads over the whole corpus)."""
    t0 = time.perf_counter()
    skipped = Skipped()
    digest = hashlib.sha256()
    sample = LowestHashSample(sample_bytes) if sample_bytes else None
    split = ValidationRule(cfg.val_fraction)
    n_docs = n_bytes = 0
    for doc in iter_documents(cfg, skipped):
        body = doc.text.encode("utf-8")
        name = doc.name.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name + len(body).to_bytes(8, "little"))
        digest.update(body)
        n_docs, n_bytes = n_docs + 1, n_bytes + len(body)
        split.see(doc.name)
        if sample:
            sample.add(doc, len(body))
    if not n_docs:
        raise UserError(f"data.source: no documents with text found in {cfg.source!r}"
                        + (f" ({skipped})" if skipped.count else ""))
    log(f"data: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB of text from {cfg.source!r}"
        + (f" ({skipped})" if skipped.count else "") + f" in {time.perf_counter() - t0:.1f}s")
    return CorpusScan(digest.hexdigest(), n_docs, n_bytes, sample.documents() if sample else None, split)


class LowestHashSample:
    """The documents that lead the corpus sorted by name hash until `max_bytes`: what sorting the
    whole corpus and capping would keep, in memory bounded by max_bytes plus one document."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.total, self.heap, self.seq = max_bytes, 0, [], 0

    def add(self, doc: Document, size: int) -> None:
        # A max-heap of (hash, arrival): its top is the document that sorts last.
        heapq.heappush(self.heap, (-unit_hash(doc.name), -self.seq, size, doc))
        self.seq += 1
        self.total += size
        # The largest hash is never used once the documents before it already fill the sample.
        while self.heap and self.total - self.heap[0][2] >= self.max_bytes:
            self.total -= heapq.heappop(self.heap)[2]

    def documents(self) -> list[Document]:
        """In name-hash order."""
        return [doc for *_, doc in sorted(self.heap, key=lambda e: (-e[0], -e[1]))]


# ---------------------------------------------------------------- split


def unit_hash(name: str) -> float:
    """A uniform number in [0, 1) fixed by the document's name: stable across runs and seeds."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


class ValidationRule:
    """Held out: documents whose name hash is below val_fraction; when none is, the lowest hash,
    and when all are, the highest stays in train. `see` every name first (one streaming pass)."""

    def __init__(self, val_fraction: float):
        self.val_fraction, self.n, self.n_val = val_fraction, 0, 0
        self.lowest: tuple[float, str | None] = (2.0, None)
        self.highest: tuple[float, str | None] = (-1.0, None)

    def see(self, name: str) -> None:
        u = unit_hash(name)
        self.n += 1
        self.n_val += u < self.val_fraction
        self.lowest, self.highest = min(self.lowest, (u, name)), max(self.highest, (u, name))

    def is_val(self, name: str) -> bool:
        if self.n < 2:
            raise UserError(
                "data.source: found a single document, but the train/validation split is by whole "
                "documents; use several files, or JSONL with one document per line"
            )
        if self.n_val == 0 and name == self.lowest[1]:
            return True
        if self.n_val == self.n and name == self.highest[1]:
            return False
        return unit_hash(name) < self.val_fraction


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) of a list of documents by `ValidationRule`."""
    rule = ValidationRule(val_fraction)
    for d in docs:
        rule.see(d.name)
    is_val = [rule.is_val(d.name) for d in docs]
    return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]
