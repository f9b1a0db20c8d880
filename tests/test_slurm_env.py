"""SLURM task variables → torch.distributed's, and SLURM's compressed host lists."""

import pytest

from llmtrain.errors import UserError
from llmtrain.train.slurm_env import PORT_BASE, PORT_SPAN, expand_nodelist, rank_env

TASK = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[007-008,010],cpu1",
        "SLURM_JOB_ID": "123456"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("127.0.0.1", ["127.0.0.1"]),
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("gpu[8-10],login-2", ["gpu8", "gpu9", "gpu10", "login-2"]),
    ("a[1,3-4]b,c", ["a1b", "a3b", "a4b", "c"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[a-b]", "gpu[3-1]", "a,,b", ""])
def test_bad_nodelist_is_a_value_error(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_rank_env_maps_every_variable():
    env = rank_env(TASK)
    assert env == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(PORT_BASE + 123456 % PORT_SPAN)}
    # every task of the job computes the same rendezvous port; a recipe port or MASTER_* wins
    assert rank_env({**TASK, "SLURM_PROCID": "0"})["MASTER_PORT"] == env["MASTER_PORT"]
    assert rank_env(TASK, master_port=2345)["MASTER_PORT"] == "2345"
    site = rank_env({**TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"}, master_port=2345)
    assert (site["MASTER_ADDR"], site["MASTER_PORT"]) == ("10.0.0.1", "4000")


@pytest.mark.parametrize("name", ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST"])
def test_missing_variable_is_named(name):
    env = {k: v for k, v in TASK.items() if k != name}
    with pytest.raises(UserError, match=name):
        rank_env(env)


def test_bad_values_are_named():
    with pytest.raises(UserError, match="SLURM_NTASKS='x'"):
        rank_env({**TASK, "SLURM_NTASKS": "x"})
    with pytest.raises(UserError, match="SLURM_PROCID=16 is not below SLURM_NTASKS=16"):
        rank_env({**TASK, "SLURM_PROCID": "16"})
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST"):
        rank_env({**TASK, "SLURM_JOB_NODELIST": "gpu[1-"})
