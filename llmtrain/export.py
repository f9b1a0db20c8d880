"""Consolidated weights out of a run: `llmtrain export` and the loader that `generate` shares.

A ZeRO checkpoint holds each rank's slice of the fp32 master weights; DeepSpeed's zero_to_fp32
functions stitch them back into one state dict (ZeRO-0 keeps the whole module in its model file).
The export folder is written beside its final name and renamed into place at the end, so a
failed export leaves nothing that looks complete, and an existing export is never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from llmtrain.train.checkpoint import META, complete_checkpoints, read_meta
from llmtrain.data.prepare import PreparedData
from llmtrain.errors import UserError
from llmtrain.heads.temperature import attach_temperature
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import Recipe
from llmtrain.train.universal import UNIVERSAL_DIR, saved_stage


@dataclasses.dataclass
class LoadedRun:
    model: LanguageModel  # fp32, eval mode, on CPU
    recipe: Recipe
    meta: dict
    checkpoint: Path
    tokenizer_path: Path


def find_checkpoint(target: Path) -> Path:
    """The complete checkpoint that `target` names: a checkpoint folder, or the newest complete one
    of a run / checkpoints folder. Raises UserError naming what is missing."""
    if (target / META).is_file():
        return target
    for folder in (target / "checkpoints", target):
        if found := complete_checkpoints(folder):
            return found[-1]
    if not target.exists():
        raise UserError(f"{target}: no such run folder")
    partial = sorted(p.parent for p in [*target.glob("checkpoints/*/mp_rank_*"), *target.glob("mp_rank_*")]
                     if p.parent.name != UNIVERSAL_DIR)
    if partial:
        raise UserError(f"{target}: no complete checkpoint; {partial[-1]} has no {META} (the run was stopped "
                        "while saving it). Resume the run with --resume auto to save a complete one.")
    raise UserError(f"{target}: no checkpoint there yet; train first (llmtrain run ... --out {target})")


def consolidated_state_dict(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of the whole model, on CPU, from one checkpoint."""
    if zero_stage == 0:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{tag_dir}: no mp_rank_*_model_states.pt file")
        module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said explicitly, DeepSpeed skips its detection warning
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per parameter group
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def trained_model(recipe: Recipe, vocab_size: int) -> LanguageModel:
    """The recipe's model as it was trained, weights to be loaded: with its temperature network
    when the recipe has one (the worker attaches it the same way)."""
    model = LanguageModel(recipe.model, recipe.head_spec(), vocab_size, load_weights=False)
    if recipe.temperature.enabled:
        attach_temperature(model.head, **recipe.temperature.network_options())
    return model


def load_run(target: Path) -> LoadedRun:
    """The model of a run's checkpoint, consolidated, with its recipe and tokenizer."""
    tag_dir = find_checkpoint(target)
    meta = read_meta(tag_dir)
    recipe = Recipe.model_validate(meta["recipe"])
    tokenizer_path, vocab_size = _tokenizer_of(tag_dir, meta)
    state = consolidated_state_dict(tag_dir, saved_stage(meta))
    model = trained_model(recipe, vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{tag_dir}: the checkpoint does not match its recipe's model "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return LoadedRun(model, recipe, meta, tag_dir, tokenizer_path)


def _tokenizer_of(tag_dir: Path, meta: dict) -> tuple[Path, int]:
    """The run's tokenizer.json (in the data cache, named by the run folder's data.json), checked
    against the hash the checkpoint recorded, and its vocabulary size."""
    from llmtrain.data.cache import sha256_file

    run_dir = tag_dir.parent.parent
    data_json = run_dir / "data.json"
    if not data_json.is_file():
        raise UserError(f"{data_json}: missing; it names the run's tokenizer (is {run_dir} a run folder?)")
    prepared = PreparedData.from_json(data_json.read_text())
    path = Path(prepared.tokenizer_path)
    if not path.is_file():
        raise UserError(f"{path}: the run's tokenizer is gone from the data cache; run `llmtrain run` with the "
                        "run's recipe once to prepare it again")
    if sha256_file(path) != meta.get("tokenizer_hash"):
        raise UserError(f"{path}: this tokenizer differs from the one {tag_dir} was trained with (content hash)")
    return path, prepared.vocab_size


def export_run(target: Path, out: Path, log: Callable[[str], None] = print) -> list[str]:
    """Write model.safetensors, tokenizer.json, recipe.yaml, llmtrain.json and (for the softmax
    and cce heads) hf/ into the new folder `out`. Returns the names written."""
    from safetensors.torch import save_file

    from llmtrain.model.hf_export import hf_export_problem, write_hf_export
    from llmtrain.model.hf_llama import hf_incompatibility, write_hf_folder

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not empty; choose a new folder (nothing was written)")
    run = load_run(target)
    log(f"exporting {run.checkpoint} (step {run.meta['step']}, head {run.recipe.head.type})")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # safetensors stores no aliasing: a tied weight is written under both names.
        state = {k: v.detach().clone().contiguous() for k, v in run.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "llmtrain_step": str(run.meta["step"])})
        shutil.copyfile(run.tokenizer_path, tmp / "tokenizer.json")
        (tmp / "recipe.yaml").write_text(run.recipe.to_yaml())
        (tmp / META).write_text(json.dumps({
            "step": run.meta["step"], "tokens_seen": run.meta.get("tokens_seen"), "source": str(run.checkpoint),
            "tokenizer_hash": run.meta["tokenizer_hash"], "vocab_size": run.model.predictable_vocab,
            "head": run.recipe.head_spec(), "exported_at": time.time()}, indent=1))
        written = ["model.safetensors", "tokenizer.json", "recipe.yaml", META]
        reason = hf_export_problem(run.recipe) if run.recipe.model.hf else hf_incompatibility(run.recipe)
        if reason is None:
            write = write_hf_export if run.recipe.model.hf else write_hf_folder
            write(run.model, run.recipe, run.tokenizer_path, tmp / "hf")
            written.append("hf/")
        else:
            log(f"no Hugging Face folder: {reason}")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def load_exported(folder: Path) -> LanguageModel:
    """An exported model.safetensors back into a LanguageModel (fp32, eval mode)."""
    from safetensors.torch import load_file

    recipe = Recipe.model_validate(yaml.safe_load((folder / "recipe.yaml").read_text()))
    state = load_file(str(folder / "model.safetensors"))
    vocab_size = json.loads((folder / META).read_text())["vocab_size"]  # the tokenizer's
    model = trained_model(recipe, vocab_size)
    model.load_state_dict(state, strict=True)
    return model.eval()
