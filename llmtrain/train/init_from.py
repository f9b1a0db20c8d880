"""`temperature.init_from`: the checkpoint a frozen_body run starts from. Only its module weights
(body and head, consolidated to fp32 from any ZeRO stage) are loaded — no optimizer state, step or
sampler position, since the run trains a new temperature network from step 0 — and they must come
from the same model, head and tokenizer as the recipe's."""

from __future__ import annotations

from pathlib import Path

import torch

from llmtrain.train.checkpoint import META, complete_checkpoints, identity_problems, read_meta
from llmtrain.errors import UserError
from llmtrain.recipe import Recipe

NETWORK_PREFIX = "head.temperature."


def resolve_init_from(recipe: Recipe, tokenizer_hash: str) -> Path:
    """The complete checkpoint folder ``temperature.init_from`` names, checked against the recipe."""
    source = recipe.temperature.init_from
    path = Path(source)
    found = path if (path / META).is_file() else None
    for folder in (path / "checkpoints", path):
        if found is None and (complete := complete_checkpoints(folder)):
            found = complete[-1]
    if found is None:
        raise UserError(f"temperature.init_from {source}: no complete checkpoint there; pass a run folder, its "
                        "checkpoints/ folder or a checkpoints/stepNNNNNNNN folder of a finished save")
    meta = read_meta(found)
    # the network itself is what frozen_body trains: compare the head without it
    saved = {**meta["identity"], "head": {k: v for k, v in meta["identity"]["head"].items() if k != "temperature"}}
    ours = {**recipe.identity(), "head": recipe.head_spec()}
    problems = identity_problems({**meta, "identity": saved}, ours, tokenizer_hash)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"temperature.init_from {found}: the recipe's model differs from the checkpoint's\n{lines}\n"
                        "frozen_body trains a temperature network on top of that exact model: copy its model, "
                        "head and tokenizer sections into the recipe.")
    return found


def load_module_weights(model: torch.nn.Module, tag_dir: Path) -> None:
    """Load every body and head weight of ``model`` from the checkpoint (the temperature network
    keeps its fresh init); every one of them must be there."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    wanted = [k for k in model.state_dict() if not k.startswith(NETWORK_PREFIX)]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UserError(f"temperature.init_from {tag_dir}: the checkpoint lacks {', '.join(missing[:5])}"
                        f"{' and more' if len(missing) > 5 else ''}; it was not saved from this model")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
