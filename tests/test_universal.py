"""When a resume needs a universal checkpoint, and where it is looked for (no DeepSpeed here;
the conversion itself runs in tests/test_clusters_e2e.py)."""

import pytest

from llmtrain.train.checkpoint import write_meta
from llmtrain.errors import UserError
from llmtrain.train.universal import checkpoint_to_load, convert, needs_universal, universal_path


def meta(world: int, stage: int) -> dict:
    return {"step": 4, "world_size": world, "recipe": {"deepspeed": {"zero_stage": stage}}}


@pytest.mark.parametrize("saved, now, needed", [
    ((2, 2), (2, 2), False), ((2, 2), (1, 2), True), ((1, 3), (2, 3), True), ((2, 1), (2, 2), True),
    ((2, 0), (1, 0), False),  # ZeRO-0 keeps whole optimizer states: loads on any world size
])
def test_needs_universal(saved, now, needed):
    assert needs_universal(meta(*saved), *now) is needed


def test_zero0_and_zero_stages_do_not_convert_into_each_other(tmp_path):
    with pytest.raises(UserError, match="ZeRO-0 checkpoint with deepspeed.zero_stage=2"):
        needs_universal(meta(2, 0), 2, 2)
    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    write_meta(tag, meta(2, 0))
    with pytest.raises(UserError, match="no conversion needed"):
        convert(tag)


@pytest.mark.parametrize("saved", [1, 2])
def test_zero1_and_zero2_checkpoints_are_refused_at_zero3(saved):
    with pytest.raises(UserError, match=f"ZeRO-{saved} checkpoint with deepspeed.zero_stage=3"):
        needs_universal(meta(2, saved), 2, 3)


@pytest.mark.parametrize("now", [1, 2])
def test_zero3_checkpoints_are_refused_at_zero1_and_zero2(now):
    """Through the real CLI on a real checkpoint: test_clusters_e2e's ZeRO-3 run."""
    for world in (2, 1):
        with pytest.raises(UserError, match=f"ZeRO-3 checkpoint with deepspeed.zero_stage={now}"):
            needs_universal(meta(2, 3), world, now)


def test_workers_only_look_for_a_finished_conversion(tmp_path):
    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    write_meta(tag, meta(2, 2))
    assert checkpoint_to_load(tag, 2, 2, may_convert=False) == tag
    with pytest.raises(UserError, match="llmtrain checkpoint universal"):
        checkpoint_to_load(tag, 1, 2, may_convert=False)
    ready = universal_path(tag)
    assert ready == tmp_path / "checkpoints" / "universal" / "step00000004"
    ready.mkdir(parents=True)
    with pytest.raises(UserError):  # a conversion without its marker is not finished
        checkpoint_to_load(tag, 1, 2, may_convert=False)
    write_meta(ready, {**meta(2, 2), "universal": True})
    assert checkpoint_to_load(tag, 1, 2, may_convert=False) == ready
    assert checkpoint_to_load(ready, 1, 2, may_convert=False) == ready
