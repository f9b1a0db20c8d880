"""Learning rates as pure functions of the step: resume needs no scheduler state."""

from __future__ import annotations

import math

from llmtrain.recipe import Recipe, TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `steps`: a pure function of the step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def temperature_lr_at(step: int, recipe: Recipe) -> float:
    """The temperature network's LR: constant, or the body's schedule scaled to its own peak."""
    t = recipe.temperature
    return t.lr if t.lr_schedule == "constant" else t.lr * lr_at(step, recipe.train) / recipe.train.lr
