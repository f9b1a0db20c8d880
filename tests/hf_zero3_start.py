"""Rank script of tests/test_hf_e2e.py (2 ranks, torchrun): build the LanguageModel of a Hugging
Face folder as the worker does under ZeRO-3, measuring this rank's peak anonymous memory (RssAnon,
sampled every millisecond; memory-mapped weight files are page cache, not in it) while it is built
and loaded, then take one training step on fixed ids. Rank 0 prints RESULT {json}.

usage: MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc_per_node 2 hf_zero3_start.py MODEL_FOLDER
(the malloc setting returns freed blocks to the system, so the figure is not an allocator's hoard)"""

import json
import sys
import threading
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from llmtrain.recipe import validate_recipe
from llmtrain.train.engine_config import deepspeed_config, param_groups
from llmtrain.train.worker import build_model, exit_skipping_finalizers, unlink_deepspeed_shm


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.base, self.peak, self.done = anonymous_bytes(), 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, anonymous_bytes() - self.base)
            time.sleep(0.001)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, anonymous_bytes() - self.base)


def main(folder: str) -> None:
    deepspeed.init_distributed(verbose=False)
    unlink_deepspeed_shm()
    recipe = validate_recipe({"model": {"hf": folder, "seq_len": 16}, "head": {"type": "softmax"},
                              "train": {"micro_batch": 1, "grad_clip": 0.0}, "deepspeed": {"zero_stage": 3}})
    config = deepspeed_config(recipe, dist.get_world_size())
    sampler = PeakSampler()
    sampler.start()
    model = build_model(recipe, recipe.tokenizer.vocab_size, config)  # as the worker builds it
    peak = sampler.stop()
    big = [p for p in model.parameters() if getattr(p, "ds_numel", 0) > 1e5]
    result = {"peak_anonymous_bytes": peak,
              "weights_bytes": sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")),
              "partitioned": bool(big) and all(p.numel() == 0 for p in big)}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
    ids = torch.randint(0, recipe.tokenizer.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    loss = engine(ids[:, :-1], ids[:, 1:]).loss
    engine.backward(loss)
    engine.step()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    result.update(first_loss=loss.item(), max_peak_anonymous_bytes=max(peaks))
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_skipping_finalizers(0)
