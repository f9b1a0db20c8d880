"""Checkpoint bookkeeping around DeepSpeed's save/load: which checkpoints are complete, which one
`--resume` means, whether a recipe may resume it, and pruning.

A checkpoint is a DeepSpeed tag folder `checkpoints/stepNNNNNNNN/`. It becomes visible only when
rank 0 writes `llmtrain.json` into it after every rank has finished saving, so a run killed
mid-save leaves a folder that `--resume auto` never picks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError
from llmtrain.recipe import normalize_head_spec

META = "llmtrain.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [d for d in ckpt_dir.iterdir() if d.is_dir() and (d / META).is_file()]
    return sorted(found, key=lambda d: read_meta(d)["step"])


def read_meta(tag_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((tag_dir / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{tag_dir / META}: unreadable checkpoint metadata ({e})") from None


def write_meta(tag_dir: Path, meta: dict[str, Any]) -> None:
    tmp = tag_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, tag_dir / META)  # atomic: the checkpoint is complete or invisible


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint folder that `--resume` names, or None to start fresh.

    'auto': the newest complete checkpoint of `out_dir`, or None when it has none.
    A path: a checkpoint folder, or a run / checkpoints folder whose newest complete one is used.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if (path / META).is_file():
        return path
    for folder in (path / "checkpoints", path):
        if found := complete_checkpoints(folder):
            return found[-1]
    if path.is_dir() and any(path.glob("*/mp_rank_*_model_states.pt")) or list(path.glob("mp_rank_*")):
        raise UserError(f"--resume {resume}: this checkpoint is incomplete (no {META}); the run was "
                        "interrupted while saving it. Resume from an earlier one.")
    raise UserError(f"--resume {resume}: no complete checkpoint there; pass a run folder, its "
                    "checkpoints/ folder, a checkpoints/stepNNNNNNNN folder, or 'auto'")


def identity_problems(meta: dict[str, Any], identity: dict[str, Any], tokenizer_hash: str) -> list[str]:
    """What differs between a checkpoint's saved model, head and tokenizer and ``identity``'s. Head
    options are compared as their schema types them, defaults written out: a checkpoint saved with
    raw option strings ('1e-4') or without its defaults matches the same head spelled otherwise."""
    saved = {**meta["identity"], "head": normalize_head_spec(meta["identity"].get("head") or {})}
    identity = {**identity, "head": normalize_head_spec(identity["head"])}
    problems = [
        f"{section}: checkpoint has {_diff(saved[section], identity[section])}"
        for section in ("model", "head", "tokenizer")
        if saved.get(section) != identity[section]
    ]
    if meta.get("tokenizer_hash") != tokenizer_hash:
        problems.append("tokenizer: the checkpoint was trained with another tokenizer (its content hash differs)")
    return problems


def check_compatible(meta: dict[str, Any], identity: dict[str, Any], tokenizer_hash: str, where: Path) -> None:
    """Refuse to resume a checkpoint whose model, head or tokenizer differ from the recipe's."""
    problems = identity_problems(meta, identity, tokenizer_hash)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"cannot resume {where}: the recipe changes what was trained\n{lines}\n"
                        "Only train.* (steps, lr, ...), eval.*, checkpoint.* and logging may change on resume; "
                        "start a new run (another --out) to train a different model.")


def _diff(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in old.keys() | new.keys() if k not in old or k not in new or old[k] != new[k])
        shown = lambda d, k: repr(d[k]) if k in d else "nothing"  # noqa: E731
        return ", ".join(f"{k}={shown(old, k)} where the recipe has {shown(new, k)}" for k in keys)
    return f"{old!r} where the recipe has {new!r}"


def prune(ckpt_dir: Path, keep_last: int) -> None:
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        # Remove the marker first: a crash mid-delete leaves an incomplete (ignored) folder.
        (old / META).unlink()
        shutil.rmtree(old, ignore_errors=True)
