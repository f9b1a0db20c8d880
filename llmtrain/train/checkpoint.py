"""Checkpoint bookkeeping around DeepSpeed's save/load: which checkpoints are complete and intact,
which one `--resume` means, whether a recipe may resume it, and pruning.

A checkpoint is a DeepSpeed tag folder `checkpoints/stepNNNNNNNN/`. It becomes visible only when
rank 0 writes `llmtrain.json` into it, last, after every rank has saved and every file and the
folder are fsynced. `llmtrain.json` holds the manifest: each file's size and SHA-256. A run killed
mid-save leaves a folder without it, which `--resume auto` never picks; a file truncated or changed
later fails verification, and resume falls back to the newest checkpoint that passes.
Checkpoints written before the manifest existed are accepted unverified, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from llmtrain.errors import UserError
from llmtrain.recipe import normalize_head_spec

META = "llmtrain.json"
# Written by `llmtrain run --prepare-only` (the SLURM job's first step): the checkpoint it verified,
# which srun's ranks then load for --resume auto instead of choosing again without checksums.
RESUME_FROM = ".resume-from"
TAG = re.compile(r"^step(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def tag_dirs(ckpt_dir: Path) -> list[Path]:
    """Every stepNNNNNNNN folder of `ckpt_dir`, complete or not, oldest first (by the step in its
    name: a damaged marker must not hide or reorder it)."""
    if not ckpt_dir.is_dir():
        return []
    found = [d for d in ckpt_dir.iterdir() if d.is_dir() and TAG.match(d.name)]
    return sorted(found, key=lambda d: int(TAG.match(d.name).group(1)))


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints of `ckpt_dir` with a completion marker, oldest first (not verified)."""
    return [d for d in tag_dirs(ckpt_dir) if (d / META).is_file()]


def read_meta(tag_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((tag_dir / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{tag_dir / META}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{tag_dir / META}: unreadable checkpoint metadata (not a JSON object)")
    return meta


def checkpoint_files(tag_dir: Path) -> list[str]:
    """The files a manifest covers: everything under the folder but the marker, sorted."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(META))


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest entry; fsyncs the file first so what is hashed is what is on disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    """Streamed in 8 MiB blocks: optimizer files can be larger than memory allows reading at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def manifest(tag_dir: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    return {name: file_entry(tag_dir / name) for name in (checkpoint_files(tag_dir) if names is None else names)}


def write_meta(tag_dir: Path, meta: dict[str, Any]) -> None:
    """Write the marker last and durably: the folder's entries, then the marker through a temporary
    file renamed over it, then the folder again, so after a crash the checkpoint is either complete
    on disk or invisible."""
    fsync_dir(tag_dir)
    tmp = tag_dir / (META + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tag_dir / META)
    fsync_dir(tag_dir)
    fsync_dir(tag_dir.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(tag_dir: Path, checksums: bool = True) -> str | None:
    """What is wrong with the checkpoint `tag_dir`, naming the file, or None when it is intact.
    `checksums=False` checks presence and sizes only (cheap: catches truncation)."""
    if not (tag_dir / META).is_file():
        return f"{tag_dir}: no {META}; the save did not finish (partial checkpoint)"
    try:
        meta = read_meta(tag_dir)
    except UserError as e:
        return str(e)
    for name, want in (meta.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing (the manifest in {META} lists it)"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size:,} bytes where the manifest says {want['size']:,} (truncated or overwritten)"
        if checksums and file_sha256(path) != want["sha256"]:
            return f"{path}: its SHA-256 differs from the manifest's (the file is corrupt)"
    return None


def has_manifest(tag_dir: Path) -> bool:
    return "files" in read_meta(tag_dir)


def newest_valid(ckpt_dir: Path, checksums: bool = True, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint of `ckpt_dir` that verifies; each newer one that does not is named in
    a warning. Partial folders newer than it are skipped the same way. None when there is none
    at all; UserError when every checkpoint there is damaged (starting over would be a surprise)."""
    candidates = tag_dirs(ckpt_dir)
    problems = []
    for tag_dir in reversed(candidates):
        problem = verify(tag_dir, checksums)
        if problem is None:
            if not has_manifest(tag_dir):
                warn(f"note: {tag_dir} was saved without a manifest (an older llmtrain); it is used unverified")
            return tag_dir
        problems.append(problem)
        warn(f"warning: skipping checkpoint {tag_dir.name}: {problem}")
    if any((d / META).is_file() for d in candidates):
        raise UserError(f"{ckpt_dir}: no intact checkpoint; every one failed verification:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    return None


def resolve_resume(resume: str | None, out_dir: Path, checksums: bool = True,
                   warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint folder that `--resume` names, or None to start fresh.

    'auto': the newest intact checkpoint of `out_dir`, or None when it has none.
    A path: a checkpoint folder (which must verify), or a run / checkpoints folder whose newest
    intact one is used.
    """
    if resume is None:
        return None
    if resume == "auto":
        prepared = out_dir / RESUME_FROM
        if not checksums and prepared.is_file():
            return resolve_resume(prepared.read_text().strip(), out_dir, checksums, warn)
        return newest_valid(out_dir / "checkpoints", checksums, warn)
    path = Path(resume)
    if (path / META).is_file():
        if problem := verify(path, checksums):
            raise UserError(f"--resume {resume}: {problem}; resume from another checkpoint")
        return path
    for folder in (path / "checkpoints", path):
        if complete_checkpoints(folder):
            return newest_valid(folder, checksums, warn)
    if path.is_dir() and any(path.glob("*/mp_rank_*_model_states.pt")) or list(path.glob("mp_rank_*")):
        raise UserError(f"--resume {resume}: this checkpoint is incomplete (no {META}); the run was "
                        "interrupted while saving it. Resume from an earlier one.")
    raise UserError(f"--resume {resume}: no complete checkpoint there; pass a run folder, its "
                    "checkpoints/ folder, a checkpoints/stepNNNNNNNN folder, or 'auto'")


def remove_partial(ckpt_dir: Path) -> list[Path]:
    """Delete the folders of saves that never finished (no marker). Only while no run writes into
    `ckpt_dir` (the caller holds the run folder's lock)."""
    removed = [d for d in tag_dirs(ckpt_dir) if not (d / META).is_file()]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def checkpoint_bytes(tag_dir: Path) -> int:
    """Size of a checkpoint on disk (its files as they are: a damaged marker must not matter)."""
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


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


def check_compatible(meta: dict[str, Any], identity: dict[str, Any], tokenizer_hash: str, where: Path, *,
                     corpus_hash: str | None = None, corpus: str = "", allow_data_change: bool = False) -> None:
    """Refuse to resume a checkpoint whose model, head, tokenizer or corpus differ from the
    recipe's. Another corpus is allowed with `allow_data_change`; checkpoints from before the
    corpus hash was saved are not compared."""
    problems = identity_problems(meta, identity, tokenizer_hash)
    saved_corpus = meta.get("corpus_hash")
    if saved_corpus and corpus_hash and saved_corpus != corpus_hash:
        if not allow_data_change:
            problems.insert(0, f"data: the checkpoint was trained on another corpus than data.source={corpus!r} "
                            f"gives now (corpus hash {saved_corpus[:12]}… where the data has {corpus_hash[:12]}…); "
                            "pass --allow-data-change to continue on this data")
        trained_here = identity["tokenizer"].get("path") is None
        problems = [p.replace("with another tokenizer", "with another tokenizer, trained from that other corpus "
                              "(set tokenizer.path to the run's tokenizer.json to keep it)") if trained_here else p
                    for p in problems]
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
    """Keep the newest `keep_last` complete checkpoints. The worker calls it only once a finite
    step has followed the newest save, so the checkpoint before a divergence is never removed."""
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        # Remove the marker first: a crash mid-delete leaves an incomplete (ignored) folder.
        (old / META).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
