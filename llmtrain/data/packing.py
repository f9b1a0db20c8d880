"""Packing: a split's token stream (documents, each followed by eos) cut into fixed-length blocks,
gathered from the memory-mapped shards a micro-batch at a time. Block b is tokens
[b·L, (b+1)·L) of the stream; the tail that fills no block is dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llmtrain.data.shards import TokenShards


class Blocks:
    """[len, block_len] int64 blocks of a prepared split, read on demand: block b gives inputs
    blocks[b, :-1] and targets blocks[b, 1:]. Indexed by a slice or a list of block numbers."""

    def __init__(self, path: str | Path, block_len: int):
        self.tokens = TokenShards(path)
        self.block_len = block_len
        self.n = len(self.tokens) // block_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: slice | Sequence[int]) -> torch.Tensor:
        rows = range(self.n)[index] if isinstance(index, slice) else index
        L = self.block_len
        out = np.empty((len(rows), L), dtype=np.int64)
        for i, b in enumerate(rows):
            if not 0 <= b < self.n:
                raise IndexError(f"block {b} outside 0..{self.n - 1}")
            out[i] = self.tokens.read(b * L, (b + 1) * L)
        return torch.from_numpy(out)


def load_split(path: str | Path, block_len: int) -> Blocks:
    return Blocks(path, block_len)
