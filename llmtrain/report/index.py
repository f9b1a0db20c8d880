"""`llmtrain compare`: read the run folders, write table.md, the plots and index.md tying them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError
from llmtrain.report.plots import write_plots
from llmtrain.report.runs import Run, read_run
from llmtrain.report.table import equal_time_seconds, markdown_table

INDEX = "index.md"


def labelled(runs: list[Run]) -> list[Run]:
    """Label runs by folder name, or by path where two share a name."""
    names = [r.path.name for r in runs]
    for run in runs:
        run.label = run.path.name if names.count(run.path.name) == 1 else str(run.path)
    return runs


def recipe_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """Dotted recipe keys whose values differ between the runs, with each run's value. Head
    options other than the type are left out: the table's head column shows those that are not
    the head's defaults (different heads have different option sets)."""
    flat = [{k: v for k, v in _flatten(r.recipe).items() if not k.startswith("head.") or k == "head.type"}
            for r in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if len({repr(f.get(k)) for f in flat}) > 1}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare_runs(paths: list[Path], out: Path) -> Path:
    """Write the report for `paths` into `out`; returns index.md's path."""
    seen = set()
    for path in paths:
        if path.resolve() in seen:
            raise UserError(f"{path}: named twice; pass each run folder once")
        seen.add(path.resolve())
    runs = labelled([read_run(p) for p in paths])
    if out.resolve() in seen:
        raise UserError(f"--out {out}: that is one of the run folders; choose a folder of its own for the report")
    out.mkdir(parents=True, exist_ok=True)
    seconds = equal_time_seconds(runs)
    table = markdown_table(runs)
    _write(out / "table.md", table)
    plots = write_plots(runs, out, seconds)
    _write(out / INDEX, _index(runs, table, plots))
    return out / INDEX


def _index(runs: list[Run], table: str, plots: dict[str, str]) -> str:
    lines = ["# Run comparison", "", "| run | folder | state |", "| --- | --- | --- |"]
    lines += [f"| {r.label} | `{r.path}` | {r.state} |" for r in runs]
    lines += ["", "## Table", "", table]
    differences = recipe_differences(runs)
    if differences:
        lines += ["## What differs between the recipes", ""]
        lines += [f"- `{key}`: " + ", ".join(f"{r.label} = {v}" for r, v in zip(runs, values))
                  for key, values in differences.items()]
        lines.append("")
    notes = _notes(runs)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Plots", ""]
    for name, title in plots.items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def _notes(runs: list[Run]) -> list[str]:
    notes = []
    for run in runs:
        if run.running:
            notes.append(f"{run.label} is still running: its figures are those logged so far, and it does not set T.")
        if not run.evals:
            notes.append(f"{run.label} has no evaluation yet: its validation columns are empty and it is in no "
                         "validation plot.")
        elif "val_bpb" not in run.evals[-1]:
            notes.append(f"{run.label} ({run.head_type}) is not a probability model: no loss, perplexity or bits per "
                         "byte, only top-k accuracy.")
        if run.recipe.get("temperature", {}).get("enabled"):
            notes.append(f"{run.label} trains with TempNet: its training loss is the DRO loss; validation is at τ = 1.")
    return notes


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
