"""Resume on another world size (or between ZeRO-1 and ZeRO-2) through DeepSpeed universal
checkpoints.

A ZeRO-1/2/3 checkpoint holds each rank's slice of the flat optimizer partitions, so it loads
only on the world size that wrote it. `ds_to_universal` rewrites it per parameter
(`zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt`), and an engine configured with
`checkpoint.load_universal` re-slices that for its own ranks.

The converted copy of `checkpoints/stepN/` lives in `checkpoints/universal/stepN/` and, like a
checkpoint, becomes visible only when `llmtrain.json` is written into it after the conversion
finished; a conversion killed half way is redone. The original checkpoint is never modified.

What carries over exactly: weights, Adam moments and step counts, the training step (so the LR,
a pure function of it), tokens seen, and the sampler's global data position. What cannot: each
rank's RNG streams (they are per rank; a new world size starts them fresh from the seed), and
the order of floating-point reductions across ranks (losses agree to ~1e-6 relative, not bit
for bit). The data order is the same only if the global batch (micro_batch × grad_accum × ranks)
is kept: going from 2 ranks to 1, double train.grad_accum or train.micro_batch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from llmtrain.train.checkpoint import META, manifest, read_meta, write_meta
from llmtrain.errors import UserError

UNIVERSAL_DIR = "universal"


def universal_path(tag_dir: Path) -> Path:
    return tag_dir.parent / UNIVERSAL_DIR / tag_dir.name


def is_universal(tag_dir: Path) -> bool:
    return bool(read_meta(tag_dir).get("universal"))


def saved_stage(meta: dict[str, Any]) -> int:
    return int(meta["recipe"]["deepspeed"]["zero_stage"])


def needs_universal(meta: dict[str, Any], world_size: int, zero_stage: int) -> bool:
    """True when the checkpoint cannot be loaded as saved by `world_size` ranks at `zero_stage`.

    ZeRO-0 keeps whole optimizer states in the model file, which any world size loads; between
    ZeRO-0 and ZeRO-1..3 there is no conversion, nor from ZeRO-1/2 to ZeRO-3: DeepSpeed 0.19.8's
    stage-3 universal loader reads stage-3 files only (seen: it finds no model-states file, and
    with one it fails on the stage-2 optimizer files, KeyError 'optimizer_state_dict'); nor back
    from ZeRO-3 to ZeRO-1/2: the stage-1/2 loader looks for mp_rank_*_model_states.pt, which a
    ZeRO-3 checkpoint (and its universal copy) does not have (seen: AssertionError in
    state_dict_factory.check_ckpt_list)."""
    before = saved_stage(meta)
    if (before == 0) != (zero_stage == 0):
        raise UserError(f"cannot resume a ZeRO-{before} checkpoint with deepspeed.zero_stage={zero_stage}: "
                        "DeepSpeed converts between stages 1, 2 and 3 only; keep the stage the run was saved with")
    if before in (1, 2) and zero_stage == 3:
        raise UserError(f"cannot resume a ZeRO-{before} checkpoint with deepspeed.zero_stage=3: DeepSpeed's "
                        "ZeRO-3 loader reads ZeRO-3 checkpoints only; resume at deepspeed.zero_stage=1 or 2 "
                        "(another world size works)")
    if before == 3 and zero_stage in (1, 2):
        raise UserError(f"cannot resume a ZeRO-3 checkpoint with deepspeed.zero_stage={zero_stage}: DeepSpeed's "
                        "ZeRO-1/2 loader reads ZeRO-1/2 checkpoints only; resume at deepspeed.zero_stage=3 "
                        "(another world size works)")
    return before > 0 and (meta["world_size"] != world_size or before != zero_stage)


def convert(tag_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The universal copy of the complete checkpoint `tag_dir`, converting it when not done yet."""
    meta = read_meta(tag_dir)
    if meta.get("universal"):
        return tag_dir
    if saved_stage(meta) == 0:
        raise UserError(f"{tag_dir}: a ZeRO-0 checkpoint loads on any world size as it is; no conversion needed")
    out = universal_path(tag_dir)
    if (out / META).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)  # our own conversion, interrupted before its marker was written
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {tag_dir} ({meta['world_size']} ranks, ZeRO-{saved_stage(meta)}) to a universal checkpoint in {out}")
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", workers, "--num_merge_workers", workers]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise UserError(f"{tag_dir}: DeepSpeed's ds_to_universal failed (exit {proc.returncode}); nothing was "
                        f"changed. Its last lines:\n{tail}")
    write_meta(out, {**meta, "universal": True, "converted_from": str(tag_dir), "files": manifest(out)})
    return out


def checkpoint_to_load(tag_dir: Path, world_size: int, zero_stage: int, *, may_convert: bool,
                       log: Callable[[str], None] = print) -> Path:
    """The folder to load `tag_dir` from with `world_size` ranks at `zero_stage`: itself, or its
    universal copy (converted here when `may_convert`; workers started by srun only look for it,
    the single preparing process converts)."""
    meta = read_meta(tag_dir)
    if meta.get("universal") or not needs_universal(meta, world_size, zero_stage):
        return tag_dir
    if may_convert:
        return convert(tag_dir, log)
    ready = universal_path(tag_dir)
    if (ready / META).is_file():
        return ready
    raise UserError(f"{tag_dir}: saved by {meta['world_size']} ranks at ZeRO-{saved_stage(meta)}, this job has "
                    f"{world_size} at ZeRO-{zero_stage} and no universal copy exists yet; run "
                    f"`llmtrain checkpoint universal {tag_dir}` first (launch/slurm.sbatch does it before srun)")
