"""What `deepspeed.initialize` is given: the DeepSpeed config from a recipe and the optimizer's
parameter groups. Also read by `llmtrain profile`, which models the same config."""

from __future__ import annotations

import torch

from llmtrain.recipe import Recipe


def deepspeed_config(recipe: Recipe, world_size: int, load_universal: bool = False) -> dict:
    t, d = recipe.train, recipe.deepspeed
    zero: dict = {"stage": d.zero_stage}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer}
    if d.offload_param != "none":
        zero["offload_param"] = {"device": d.offload_param}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        # torch's AdamW on CPU; DeepSpeed's fused Adam needs CUDA.
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                  "weight_decay": t.weight_decay,
                                                  "torch_adam": not torch.cuda.is_available()}},
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return _merge(config, d.config)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def param_groups(model: torch.nn.Module, weight_decay: float, network_weight_decay: float = 0.0) -> list[dict]:
    """Decay matrices only (not norms, biases); a tied weight appears once; frozen weights are left
    out. The temperature network's parameters form their own groups (tagged "temperature": their
    own learning rate); empty groups are dropped."""
    net = getattr(getattr(model, "head", None), "temperature", None)
    in_net = {id(p) for p in net.parameters()} if net is not None else set()
    groups = {(kind, decays): [] for kind in ("model", "temperature") for decays in (True, False)}
    seen = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        # ds_shape: a model built under ZeRO-3 (a Hugging Face body) holds 1-d stand-ins already
        groups["temperature" if id(p) in in_net else "model", len(getattr(p, "ds_shape", p.shape)) >= 2].append(p)
    decay = {"model": weight_decay, "temperature": network_weight_decay}
    return [{"params": params, "weight_decay": decay[kind] if decays else 0.0, "lr_kind": kind}
            for (kind, decays), params in groups.items() if params]
