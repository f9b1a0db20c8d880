"""The resumable sampler: which blocks each rank trains on, as a function of a small state."""

from __future__ import annotations

import torch

from llmtrain.errors import UserError


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
