"""The resumable sampler: which blocks each rank trains on, as a function of a small state."""

from __future__ import annotations

import numpy as np
import torch

from llmtrain.errors import UserError

# Blocks per chunk of the epoch's permutation: its largest array (8 bytes a block, 2 MiB here).
CHUNK_BLOCKS = 1 << 18


class ResumableSampler:
    """Each epoch walks one global permutation of all blocks; a global micro-step takes the next
    world_size × micro_batch blocks and rank r gets the r-th slice.

    The permutation never exists as an array of the corpus's length: the blocks fall into chunks
    of CHUNK_BLOCKS consecutive blocks; an epoch visits the chunks in a seeded order, and each
    chunk's blocks in a seeded order of its own, made when the walk reaches it. A corpus of one
    chunk gets torch.randperm(n_blocks) seeded by seed + epoch.

    The state {epoch, offset} counts GLOBAL blocks, so it does not depend on the world size: a run
    resumed on another world size (same global batch) continues at the same place in the data. An
    epoch ends when fewer than one global batch of blocks is left; those wait for a later epoch's
    permutation.
    """

    def __init__(self, n_blocks: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 chunk_blocks: int = CHUNK_BLOCKS):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch < 1:
            raise UserError(f"train.micro_batch: must be at least 1, got {micro_batch}")
        if micro_batch * world_size > n_blocks:
            raise UserError(f"train.micro_batch: {micro_batch} × {world_size} ranks needs {micro_batch * world_size} "
                            f"blocks per step, but the data has only {n_blocks}; use more data or a smaller batch")
        self.n_blocks, self.micro_batch, self.rank, self.world_size, self.seed = (
            n_blocks, micro_batch, rank, world_size, seed)
        self.chunk_blocks = chunk_blocks
        self.n_chunks = -(-n_blocks // chunk_blocks)
        self.epoch = 0
        self.offset = 0
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None  # epoch, chunk order, where each starts
        self._chunk: tuple[int, int, torch.Tensor] | None = None  # epoch, chunk, its permutation

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        """Stream c < n_chunks orders chunk c's blocks; stream n_chunks orders the chunks."""
        return torch.Generator().manual_seed((self.seed + epoch + (stream << 32)) % 2**63)

    def _chunk_size(self, chunk: int) -> int:
        return min(self.chunk_blocks, self.n_blocks - chunk * self.chunk_blocks)

    def block_at(self, epoch: int, position: int) -> int:
        """The block at `position` of epoch's permutation."""
        if self._order is None or self._order[0] != epoch:
            order = (torch.randperm(self.n_chunks, generator=self._generator(epoch, self.n_chunks)).numpy()
                     if self.n_chunks > 1 else np.zeros(1, dtype=np.int64))
            sizes = np.array([self._chunk_size(c) for c in order], dtype=np.int64)
            self._order = (epoch, order, np.cumsum(sizes) - sizes)
        _, order, starts = self._order
        k = int(np.searchsorted(starts, position, side="right")) - 1
        chunk = int(order[k])
        if self._chunk is None or self._chunk[:2] != (epoch, chunk):
            perm = torch.randperm(self._chunk_size(chunk), generator=self._generator(epoch, chunk))
            self._chunk = (epoch, chunk, perm)
        return chunk * self.chunk_blocks + int(self._chunk[2][position - int(starts[k])])

    def next_indices(self) -> list[int]:
        """This rank's block indices for the next micro-step."""
        global_batch = self.micro_batch * self.world_size
        if self.offset + global_batch > self.n_blocks:
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.micro_batch
        self.offset += global_batch
        return [self.block_at(self.epoch, p) for p in range(start, start + self.micro_batch)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n_blocks": self.n_blocks}

    def load_state_dict(self, state: dict) -> None:
        if state["n_blocks"] != self.n_blocks:
            raise UserError(f"resume: the checkpoint's data had {state['n_blocks']} training blocks, this "
                            f"data has {self.n_blocks}; resume with the data the run started with")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
