"""DeepSpeed hostfiles: parsed with line-numbered errors; the multi-node launcher command."""

import sys

import pytest

from llmtrain.errors import UserError
from llmtrain.launch.hostfile import Host, read_hostfile
from llmtrain.launch.local import hostfile_command
from llmtrain.recipe import validate_recipe


def test_reads_hosts_comments_and_blank_lines(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# two nodes\nworker-1 slots=8\n\n10.0.0.2   slots = 8   # second\n")
    assert read_hostfile(f) == [Host("worker-1", 8), Host("10.0.0.2", 8)]


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("worker-1 slots=8\nworker-2 slot=8\nworker-3\nworker-1 slots=8\nworker-4 slots=0\n")
    with pytest.raises(UserError) as info:
        read_hostfile(f)
    msg = str(info.value)
    assert str(f) in msg and "4 problems" in msg
    assert "line 2" in msg and "line 3" in msg and "line 4: worker-1 is listed twice" in msg and "line 5" in msg
    assert "line 1" not in msg


def test_missing_or_empty_hostfile(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_hostfile(tmp_path / "nope")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(UserError, match="no hosts listed"):
        read_hostfile(tmp_path / "empty")


def test_hostfile_command_passes_deepspeed_options_through(tmp_path):
    recipe = validate_recipe({"launch": {"master_port": 29611}})
    cmd = hostfile_command(recipe, tmp_path / "hosts", "openmpi", ["--include", "n1"], ["RUN"])
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    joined = " ".join(cmd)
    assert f"--hostfile {tmp_path / 'hosts'}" in joined and "--launcher openmpi --include n1" in joined
    assert "--master_port 29611" in joined and cmd[-3:] == ["--module", "llmtrain.train", "RUN"]
    slurm = hostfile_command(recipe, tmp_path / "hosts", "slurm", [], ["RUN"])
    # DeepSpeed's srun line runs a script and sets no RANK: the worker maps SLURM's variables
    assert slurm[-3].endswith("llmtrain/train/__main__.py") and slurm[-2:] == ["RUN", "--slurm"]
