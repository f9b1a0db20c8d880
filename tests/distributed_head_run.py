"""Train a tiny embedding → head model for a few steps under real DeepSpeed ranks and print the
per-step losses as JSON. Run by tests through torchrun; one process per rank (gloo on CPU).

usage: torchrun --nproc_per_node 2 tests/distributed_head_run.py '<head spec JSON>' STAGE STEPS [tie] [bf16]
"""

import json
import os
import sys

import deepspeed
import torch
from torch import nn

from llmtrain.heads import build_head
from llmtrain.heads.temperature import attach_temperature
from llmtrain.train.worker import exit_skipping_finalizers, unlink_deepspeed_shm

VOCAB, HIDDEN, TOKENS_PER_RANK = 512, 32, 64


class TinyLM(nn.Module):
    def __init__(self, spec, tie):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        spec = dict(spec)
        temperature = spec.pop("temperature", None)  # {"width": ..., ...}: TempNet options
        self.head = build_head(spec, hidden_size=HIDDEN, vocab_size=VOCAB)
        if temperature is not None:
            attach_temperature(self.head, **temperature)
        if tie:
            self.embed.weight = self.head.weight

    def forward(self, ids, targets):
        return self.head(torch.tanh(self.mix(self.embed(ids))), targets)


def main():
    spec, stage, steps = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    tie, bf16 = "tie" in sys.argv[4:], "bf16" in sys.argv[4:]
    torch.manual_seed(0)
    model = TinyLM(spec, tie)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        # threshold 0: ZeRO-3 partitions every parameter, however small (the default keeps
        # parameters under 1e5 elements whole, which would leave this tiny head unpartitioned)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},  # the module in bf16, fp32 master weights
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    unlink_deepspeed_shm()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, VOCAB, (TOKENS_PER_RANK,), generator=g)
        targets = (ids * 7 + 3) % VOCAB  # a learnable map, so losses fall
        targets[::9] = -100
        out = engine(ids, targets)
        engine.backward(out.loss)
        engine.step()
        mean = out.loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world)
    if rank == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_skipping_finalizers(0)
