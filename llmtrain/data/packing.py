"""Packing: token streams cut into fixed-length blocks, saved as a datasets (Arrow) folder that
workers load with `load_split`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmtrain.data.sources import Document
from llmtrain.errors import UserError

# Text per encode_batch call: bounds the memory held by Encoding objects at once.
ENCODE_CHUNK_BYTES = 4 << 20


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


def pack_split(tok, docs: list[Document], eos_id: int, block_len: int, path: Path) -> tuple[np.ndarray, int]:
    stream = token_stream(tok, docs, eos_id)
    blocks = pack_blocks(stream, block_len)
    save_blocks(blocks, path)
    return blocks, len(stream)
