"""Corpus sources: the documents of a recipe's `data.source`, read one at a time, and the
train/validation split by document-name hash."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

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
    for doc, size in cap_bytes(docs, cfg.max_bytes):
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


def unit_hash(name: str) -> float:
    """A uniform number in [0, 1) fixed by the document's name: stable across runs and seeds."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) by the hash of each document's name; at least one document on each side."""
    if len(docs) < 2:
        raise UserError(
            "data.source: found a single document, but the train/validation split is by whole "
            "documents; use several files, or JSONL with one document per line"
        )
    u = [unit_hash(d.name) for d in docs]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):  # a small corpus can miss a small fraction: hold out the lowest hash
        is_val[int(np.argmin(u))] = True
    if all(is_val):
        is_val[int(np.argmax(u))] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val
