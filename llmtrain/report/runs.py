"""Reading a run folder for a report: its resolved recipe, status and metrics.jsonl, split into
training and evaluation records, with only the latest attempt's records where a resume re-logged
steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmtrain.errors import UserError
from llmtrain.train.metrics import read_metrics
from llmtrain.train.status import read_status

RECIPE = "recipe.resolved.yaml"
METRICS = "metrics.jsonl"


@dataclass
class Run:
    path: Path
    recipe: dict[str, Any]
    status: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)  # records with `loss`, by step
    evals: list[dict[str, Any]] = field(default_factory=list)  # records with `val_top1`, by step
    label: str = ""

    @property
    def state(self) -> str:
        return self.status.get("state") or "unknown"

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def head_type(self) -> str:
        return self.recipe.get("head", {}).get("type", "softmax")

    def tokens_at(self, step: float) -> float:
        """Tokens trained on after `step` steps, read off the training records (exact where the
        batch never changed; linear between records where a resume changed it)."""
        points = [(0, 0)] + [(r["step"], r["tokens_seen"]) for r in self.train if "tokens_seen" in r]
        return interpolate(points, step, extrapolate=True)


def read_run(path: Path) -> Run:
    """A run folder, or a UserError naming the folder and what a run folder holds."""
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; pass run folders (each made by `llmtrain run --out`)")
    if not (path / RECIPE).is_file():
        raise UserError(f"{path}: not a run folder (no {RECIPE}); pass folders made by `llmtrain run --out`")
    try:
        recipe = yaml.safe_load((path / RECIPE).read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path / RECIPE}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path / RECIPE}: not a recipe (a YAML mapping is expected)")
    records = read_records(path / METRICS)
    return Run(path=path, recipe=recipe, status=read_status(path),
               train=latest_attempt([r for r in records if "loss" in r]),
               evals=latest_attempt([r for r in records if "val_top1" in r]), label=path.name)


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; none when the run has not logged yet. A torn last line (a run
    killed mid-write, or one writing now) is left out; damage elsewhere is an error."""
    parsed, _torn = read_metrics(path)
    return [r for _, r in parsed if isinstance(r, dict) and isinstance(r.get("step"), int)]


def latest_attempt(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in step order where a later record of a step (a resumed attempt re-logging it)
    replaces the earlier one and everything the abandoned attempt logged after it."""
    kept: list[dict[str, Any]] = []
    for record in records:
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()
        kept.append(record)
    return kept


def tempered_bpb(record: dict[str, Any]) -> float | None:
    """Bits per byte at each token's predicted τ (a TempNet run's evaluation): the tempered loss
    over the bytes per token, which the same record gives as val_loss / val_bpb."""
    if "val_loss_tau" not in record or not record.get("val_loss"):
        return None
    return record["val_loss_tau"] * record["val_bpb"] / record["val_loss"]


def interpolate(points: list[tuple[float, float]], x: float, extrapolate: bool = False) -> float | None:
    """The piecewise-linear value at x through (x, y) points sorted by x; None outside their span
    unless `extrapolate` (then the end segments are extended)."""
    if not points:
        return None
    if len(points) == 1:
        return points[0][1] if x == points[0][0] or extrapolate else None
    if not extrapolate and not points[0][0] <= x <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1 or (x1, y1) == points[-1]:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None
