"""Test instrumentation, active only in llmtrain workers started with this folder on PYTHONPATH and
RECOMPUTE_PROBE=PREFIX set. After deepspeed.initialize it wraps the forward of the first module
holding weights in each block of the body, and at each training-mode call appends one JSON line to
PREFIX.RANK: the block, whether the call ran inside backward (a recomputation), and for every
block whether its weight was whole at that moment (ZeRO-3 gathers a weight only around its
module's forward; inside forward is after DeepSpeed's hooks, whatever order hooks run in)."""

import json
import os
import sys

if os.environ.get("RECOMPUTE_PROBE") and "llmtrain.train" in getattr(sys, "orig_argv", ()):
    import deepspeed
    import torch

    _initialize = deepspeed.initialize

    def _whole(weight) -> bool:
        return weight.numel() == getattr(weight, "ds_numel", weight.numel())

    def _probe(engine):
        body = engine.module.body
        blocks = body.blocks if hasattr(body, "blocks") else body.model.layers
        out = open(f"{os.environ['RECOMPUTE_PROBE']}.{os.environ.get('RANK', 0)}", "a", buffering=1)
        modules = [next(m for m in block.modules() if any(True for _ in m.parameters(recurse=False))) for block in blocks]
        weights = [next(m.parameters(recurse=False)) for m in modules]
        for i, module in enumerate(modules):
            def forward(*args, _module=module, _forward=module.forward, _block=i, **kwargs):
                if _module.training:  # training steps, not evaluation (model.eval())
                    out.write(json.dumps({"block": _block, "backward": torch._C._current_graph_task_id() != -1,
                                          "whole": [_whole(w) for w in weights]}) + "\n")
                return _forward(*args, **kwargs)

            module.forward = forward

    def initialize(*args, **kwargs):
        result = _initialize(*args, **kwargs)
        _probe(result[0])
        return result

    deepspeed.initialize = initialize
