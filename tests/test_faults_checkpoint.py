"""Checkpoint integrity without ranks: the manifest catches truncation, bit flips, missing files
and damaged markers; resume falls back to the newest intact checkpoint naming the bad file;
pruning and listing survive a zero-length marker; a torn metrics line is dropped on resume."""

import json

import pytest

from llmtrain.errors import UserError
from llmtrain.train.checkpoint import (META, complete_checkpoints, manifest, newest_valid, prune, resolve_resume,
                                       tag_for, verify, write_meta)
from llmtrain.train.metrics import truncate_after


def _ckpt(root, step, payload=b"weights" * 100):
    d = root / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(payload + bytes([step]))
    (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(payload * 2)
    write_meta(d, {"step": step, "files": manifest(d)})
    return d


def _flip(path, offset=10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_catches_truncation_bit_flip_and_missing_files(tmp_path):
    d = _ckpt(tmp_path, 2)
    assert verify(d) is None
    optim = d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _flip(optim)
    assert "zero_pp_rank_1" in verify(d) and "SHA-256" in verify(d)
    assert verify(d, checksums=False) is None  # same size: only the checksum sees a flip
    optim.write_bytes(optim.read_bytes()[:-5])
    assert "truncated" in verify(d, checksums=False)
    optim.unlink()
    assert "missing" in verify(d)
    (d / META).write_text("")
    assert "unreadable" in verify(d)


def test_resume_falls_back_to_the_newest_intact_one_and_names_the_bad_files(tmp_path):
    good = _ckpt(tmp_path, 2)
    flipped = _ckpt(tmp_path, 4)
    _flip(flipped / "mp_rank_00_model_states.pt")
    empty_marker = _ckpt(tmp_path, 6)
    (empty_marker / META).write_text("")
    partial = tmp_path / "checkpoints" / tag_for(8)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    said = []
    assert resolve_resume("auto", tmp_path, warn=said.append) == good
    text = "\n".join(said)
    assert str(flipped / "mp_rank_00_model_states.pt") in text and str(empty_marker / META) in text
    assert "partial" in text
    with pytest.raises(UserError, match="SHA-256"):  # asked for by name: refused, not replaced
        resolve_resume(str(flipped), tmp_path)


def test_every_checkpoint_bad_is_an_error_not_a_fresh_start(tmp_path):
    d = _ckpt(tmp_path, 2)
    _flip(d / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="no intact checkpoint"):
        newest_valid(tmp_path / "checkpoints", warn=lambda _: None)
    assert newest_valid(tmp_path / "nothing", warn=lambda _: None) is None


def test_a_zero_length_marker_does_not_break_listing_or_pruning(tmp_path):
    old = _ckpt(tmp_path, 2)
    (old / META).write_text("")
    for step in (4, 6, 8):
        _ckpt(tmp_path, step)
    assert [d.name for d in complete_checkpoints(tmp_path / "checkpoints")] == [tag_for(s) for s in (2, 4, 6, 8)]
    prune(tmp_path / "checkpoints", keep_last=2)
    assert [d.name for d in complete_checkpoints(tmp_path / "checkpoints")] == [tag_for(6), tag_for(8)]


def test_old_checkpoints_without_a_manifest_are_used_with_a_note(tmp_path):
    d = tmp_path / "checkpoints" / tag_for(2)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    write_meta(d, {"step": 2})
    said = []
    assert resolve_resume("auto", tmp_path, warn=said.append) == d
    assert "without a manifest" in said[0]


def test_a_torn_last_metrics_line_is_dropped_and_other_damage_refused(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')
    truncate_after(path, 2)
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert "torn last line" in capsys.readouterr().err
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(UserError, match="line 2 is not JSON"):
        truncate_after(path, 2)
