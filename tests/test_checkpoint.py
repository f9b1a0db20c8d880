"""Checkpoint bookkeeping: completeness marker, resume resolution, compatibility, pruning."""

import pytest

from llmtrain.train.checkpoint import META, check_compatible, complete_checkpoints, prune, resolve_resume, tag_for, write_meta
from llmtrain.errors import UserError

IDENTITY = {"model": {"layers": 2, "d_model": 32}, "head": {"type": "softmax"}, "tokenizer": {"vocab_size": 512}}


def _ckpt(root, step, complete=True):
    d = root / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        write_meta(d, {"step": step, "identity": IDENTITY, "tokenizer_hash": "abc", "world_size": 2})
    return d


def test_auto_picks_newest_complete_and_ignores_partial(tmp_path):
    _ckpt(tmp_path, 4)
    newest = _ckpt(tmp_path, 8)
    _ckpt(tmp_path, 12, complete=False)
    assert resolve_resume("auto", tmp_path) == newest
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == newest
    assert resolve_resume(str(newest), tmp_path) == newest
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "fresh") is None


def test_explicit_partial_or_missing_checkpoint_is_a_clear_error(tmp_path):
    partial = _ckpt(tmp_path, 12, complete=False)
    with pytest.raises(UserError, match="incomplete"):
        resolve_resume(str(partial), tmp_path)
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)


def test_compatibility_names_what_changed(tmp_path):
    meta = {"identity": IDENTITY, "tokenizer_hash": "abc"}
    check_compatible(meta, IDENTITY, "abc", tmp_path)  # same: fine
    changed = {**IDENTITY, "model": {"layers": 3, "d_model": 32}, "head": {"type": "cce"}}
    with pytest.raises(UserError) as info:
        check_compatible(meta, changed, "zzz", tmp_path)
    msg = str(info.value)
    assert "layers=2 where the recipe has 3" in msg and "'softmax' where the recipe has 'cce'" in msg
    assert "another tokenizer" in msg


def test_prune_keeps_last_k_complete(tmp_path):
    for s in (2, 4, 6, 8):
        _ckpt(tmp_path, s)
    prune(tmp_path / "checkpoints", keep_last=2)
    assert [d.name for d in complete_checkpoints(tmp_path / "checkpoints")] == [tag_for(6), tag_for(8)]
    assert not (tmp_path / "checkpoints" / tag_for(2)).exists()
    assert all((d / META).exists() for d in complete_checkpoints(tmp_path / "checkpoints"))
