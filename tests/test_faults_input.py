"""Input hygiene: safe run names, deepspeed.config that contradicts validated keys, the SLURM
script's quoting, and the lock on a run folder."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import ROOT, checkout_env
from llmtrain.errors import UserError
from llmtrain.launch.lock import RunLock
from llmtrain.launch.slurm_script import render
from llmtrain.recipe import load_recipe


def _recipe(tmp_path, body, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("name", ["../../etc", "a\ntouch /tmp/pwned", "x y", "-rf", ".hidden", "a/b", "$(id)"])
def test_unsafe_names_are_refused_naming_the_field(tmp_path, name):
    with pytest.raises(UserError, match="name") as info:
        load_recipe(_recipe(tmp_path, {"name": name}))
    assert "letters, digits" in str(info.value)


def test_a_file_name_with_odd_characters_gives_a_safe_default_name(tmp_path):
    assert load_recipe(_recipe(tmp_path, {}, name="my recipe (v2).yaml")).name == "my-recipe--v2-"


def test_deepspeed_config_contradicting_recipe_keys_is_refused_listing_both(tmp_path):
    body = {"deepspeed": {"zero_stage": 2, "config": {"zero_optimization": {"stage": 3}, "optimizer": {"params": {"lr": 1.0}},
                                                      "train_micro_batch_size_per_gpu": 8, "scheduler": {"type": "WarmupLR"}}},
            "train": {"micro_batch": 8}}
    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, body))
    msg = str(info.value)
    assert "deepspeed.config.zero_optimization.stage=3 contradicts deepspeed.zero_stage=2" in msg
    assert "deepspeed.config.optimizer.params.lr=1.0 contradicts train.lr=0.003" in msg
    assert "deepspeed.config.scheduler" in msg
    assert "train_micro_batch_size_per_gpu" not in msg  # the same value as train.micro_batch: allowed
    same = {"deepspeed": {"config": {"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 1}}}
    assert load_recipe(_recipe(tmp_path, same)).deepspeed.config["zero_optimization"]["overlap_comm"] is True


def test_every_value_in_the_slurm_script_reaches_bash_unchanged(tmp_path):
    """Hostile paths and overrides: bash must read back exactly what was given, running nothing."""
    canary = tmp_path / "ran"
    recipe = tmp_path / "r\ntouch ran\n $(touch ran) '\"`touch ran`;.yaml"  # bash runs in tmp_path
    overrides = [f"data.source=a b; touch {canary}", "name=$(touch x)", "train.lr='1e-3'"]
    text = render(recipe=recipe, overrides=overrides, run_dir=tmp_path / "run", nodes=1, gpus_per_node=2,
                  job_name="job", python=f"/opt/py thon/$(touch {canary})")
    header = text.split('echo "llmtrain: job')[0]  # comments, #SBATCH lines, variables: safe to run
    script = header + '\nprintf "%s\\0" "$RECIPE" "$RUN_DIR" "${OVERRIDES[@]}"\n'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.split("\0")[:-1] == [str(recipe.absolute()), str((tmp_path / "run").absolute()), *overrides,
                                "launch.nodes=1", "launch.ranks_per_node=2"]
    assert not canary.exists()
    with pytest.raises(UserError, match="--out"):
        render(recipe=recipe, overrides=[], run_dir=tmp_path / "run\nsrun evil", nodes=1, gpus_per_node=1,
               job_name="job", python="python")
    with pytest.raises(UserError, match="job name"):
        render(recipe=recipe, overrides=[], run_dir=tmp_path / "run", nodes=1, gpus_per_node=1,
               job_name="a\nb", python="python")


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmtrain.launch.lock import RunLock
    lock = RunLock(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
""")


def test_the_run_folder_lock_names_its_holder_and_a_killed_holder_leaves_none(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env=checkout_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            RunLock(run)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(run)  # the kernel released the killed holder's lock
    assert (run / ".llmtrain.lock").read_text().strip() == str(os.getpid())
    lock.release()
