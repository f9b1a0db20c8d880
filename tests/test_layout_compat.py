"""A run folder written by the code before the package layout (main of 2026-11-29, kept small
under tests/fixtures) still resumes, and its trajectory is the one today's code trains."""

import shutil

import pytest

from conftest import TESTS, llmtrain, records

pytestmark = pytest.mark.slow

FIXTURE = TESTS / "fixtures" / "main-2026-11-29"


def test_an_old_run_folder_resumes_on_the_same_trajectory(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(FIXTURE / "run", old)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    resumed = llmtrain("run", old / "recipe.resolved.yaml", cache, "--out", old, "--resume", "auto")
    assert "(step 2, saved by 2 ranks)" in resumed.stderr  # it loaded step 2, not started over
    straight = tmp_path / "straight"
    llmtrain("run", FIXTURE / "recipe.yaml", cache, "--out", straight)
    old_losses = {r["step"]: r["loss"] for r in records(old)}
    new_losses = {r["step"]: r["loss"] for r in records(straight)}
    assert sorted(old_losses) == [1, 2, 3, 4]
    assert old_losses == new_losses  # steps 1-2 by the old code, 3-4 resumed by today's: bit for bit
