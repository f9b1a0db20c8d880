"""Token shards: a split's token stream as uint32 files of bounded size, each with a document index,
written as tokens arrive and read back memory-mapped.

A split folder holds `NNNNN.bin` (uint32 token ids, raw, `np.memmap`-able), `NNNNN.idx` (int64, raw:
the split-wide end offset of every document that ends in that shard; documents may cross shards)
and `shards.json`, the manifest: per shard its token count, byte sizes and sha256s. The writer's
`state()` is what an interrupted preparation resumes from (shard granularity).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from llmtrain.data.cache import sha256_file, write_json_atomic
from llmtrain.errors import UserError

TOKEN_DTYPE = np.dtype("<u4")  # little-endian uint32: vocabularies exceed 65,535 (no uint16)
INDEX_DTYPE = np.dtype("<i8")
MANIFEST = "shards.json"


class ShardWriter:
    """Appends documents' tokens to a split folder, closing a shard every `shard_tokens` tokens.

    `state` (from an earlier writer's `state()`) resumes after its last closed shard: the caller
    skips `docs_done` documents and sends the next one whole; its first `skip_tokens` tokens
    were already written and are dropped here. `on_close` runs after each shard is closed (and
    synced): the moment to save `state()`.
    """

    def __init__(self, folder: Path, shard_tokens: int, vocab_size: int, state: dict | None = None,
                 on_close: Callable[[], None] | None = None):
        self.folder, self.shard_tokens, self.vocab_size, self.on_close = folder, shard_tokens, vocab_size, on_close
        folder.mkdir(parents=True, exist_ok=True)
        state = state or {"shards": [], "n_tokens": 0, "docs_done": 0, "skip_tokens": 0}
        self.shards: list[dict] = list(state["shards"])
        self.n_tokens = state["n_tokens"]  # tokens in closed shards
        self.docs_done = state["docs_done"]  # documents ended in closed shards
        self.drop = state["skip_tokens"]
        # Split-wide end of the last document that ended in a closed shard, and of the last one sent.
        self.committed_end = self.last_end = self.n_tokens - self.drop
        self._file = self._idx = None

    def state(self) -> dict:
        """Resume point after the last closed shard."""
        return {"shards": self.shards, "n_tokens": self.n_tokens, "docs_done": self.docs_done,
                "skip_tokens": self.n_tokens - self.committed_end}

    def append(self, ids: np.ndarray, doc_lens: np.ndarray) -> None:
        """Write whole documents' tokens (each ending with eos); `doc_lens` their lengths."""
        if ids.size and int(ids.max()) >= self.vocab_size:
            bad = int(ids.max())
            raise UserError(f"tokenizer: token id {bad} is outside the vocabulary of {self.vocab_size} "
                            f"(writing {self._path(len(self.shards), '.bin')}); the tokenizer.json is inconsistent")
        ends = self.last_end + np.cumsum(doc_lens, dtype=np.int64)
        if ends.size:
            self.last_end = int(ends[-1])
        if self.drop:
            cut = min(self.drop, ids.size)
            ids, self.drop = ids[cut:], self.drop - cut
        ids = np.ascontiguousarray(ids, dtype=TOKEN_DTYPE)
        start = self.n_tokens + self._open_tokens()
        while ids.size:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens
            piece, ids = ids[:room], ids[room:]
            self._write(piece, ends[(ends > start) & (ends <= start + piece.size)])
            start += piece.size
            if self._tokens == self.shard_tokens:
                self._close()

    def finish(self) -> dict:
        """Close the last shard and write the manifest; returns it."""
        if self._file is not None:
            self._close()
        manifest = {"n_tokens": self.n_tokens, "n_docs": self.docs_done, "shards": self.shards}
        write_json_atomic(self.folder / MANIFEST, manifest)
        return manifest

    # ---------------------------------------------------------------- one shard

    def _path(self, i: int, suffix: str) -> Path:
        return self.folder / f"{i:05d}{suffix}"

    def _open_tokens(self) -> int:
        return self._tokens if self._file is not None else 0

    def _open(self) -> None:
        i = len(self.shards)
        self._file, self._idx = open(self._path(i, ".bin"), "wb"), open(self._path(i, ".idx"), "wb")
        self._tokens, self._ndocs = 0, 0
        self._sha, self._idx_sha = hashlib.sha256(), hashlib.sha256()
        self._last_doc_end = None

    def _write(self, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        data, index = tokens.tobytes(), doc_ends.astype(INDEX_DTYPE).tobytes()
        self._file.write(data)
        self._idx.write(index)
        self._sha.update(data)
        self._idx_sha.update(index)
        self._tokens += tokens.size
        self._ndocs += doc_ends.size
        if doc_ends.size:
            self._last_doc_end = int(doc_ends[-1])

    def _close(self) -> None:
        i = len(self.shards)
        for f in (self._file, self._idx):
            f.flush()
            os.fsync(f.fileno())  # the manifest that names this shard must not outlive its bytes
            f.close()
        entry = {"file": self._path(i, ".bin").name, "index": self._path(i, ".idx").name,
                 "tokens": self._tokens, "docs": self._ndocs, "bytes": self._tokens * TOKEN_DTYPE.itemsize,
                 "index_bytes": self._ndocs * INDEX_DTYPE.itemsize,
                 "sha256": self._sha.hexdigest(), "index_sha256": self._idx_sha.hexdigest()}
        self.shards.append(entry)
        self.n_tokens += self._tokens
        self.docs_done += self._ndocs
        if self._last_doc_end is not None:
            self.committed_end = self._last_doc_end
        self._file = self._idx = None
        if self.on_close:
            self.on_close()


# ---------------------------------------------------------------- reading and checking


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        hint = (" (it holds Arrow blocks written by an older llmtrain: run `llmtrain run RECIPE --out RUN "
                "--resume auto` to prepare the data again in today's format)") if any(Path(folder).glob("*.arrow")) else ""
        raise UserError(f"data: {folder} has no {MANIFEST}{hint}; delete it so the data is prepared again")
    return json.loads(path.read_text())


def damaged_shards(folder: Path, checksums: bool = True) -> list[str]:
    """Problems of a split folder's shards against its manifest (size; with checksums, sha256):
    one line per bad file, empty when all is well."""
    folder = Path(folder)
    problems = []
    for shard in read_manifest(folder)["shards"]:
        for name, size, sha in ((shard["file"], shard["bytes"], shard["sha256"]),
                                (shard["index"], shard["index_bytes"], shard["index_sha256"])):
            path = folder / name
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != size:
                problems.append(f"{path}: {path.stat().st_size:,} bytes, the manifest says {size:,}")
            elif checksums and sha256_file(path) != sha:
                problems.append(f"{path}: sha256 does not match the manifest")
    return problems


class TokenShards:
    """A split's token stream, memory-mapped shard by shard: nothing is read until asked for."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        manifest = read_manifest(folder)
        problems = damaged_shards(folder, checksums=False)  # sizes only: cheap; prepare checked sums
        if problems:
            raise UserError(f"data: damaged shard {problems[0]}; run `llmtrain run` again so the data "
                            "is checked and rebuilt")
        self.maps = [np.memmap(folder / s["file"], dtype=TOKEN_DTYPE, mode="r") if s["tokens"] else
                     np.zeros(0, TOKEN_DTYPE) for s in manifest["shards"]]
        self.starts = np.cumsum([0] + [s["tokens"] for s in manifest["shards"]], dtype=np.int64)
        self.n_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, across shard boundaries."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            local = start - int(self.starts[first])
            piece = self.maps[first][local: local + (stop - start)]
            pieces.append(piece)
            start += piece.size
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
