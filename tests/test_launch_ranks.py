"""launch.ranks, the per-node launcher of local runs: each rank gets what DeepSpeed's per-node
launcher gives it (compared with deepspeed.launcher.launch itself), without importing torch; a
rank that fails, or a signal to the launcher, ends every rank. Stand-in ranks (rank_probe.py)
make these seconds; the end-to-end tests run real ones through `llmtrain run`."""

import base64
import json
import signal
import subprocess
import sys
import time

import psutil

from conftest import ROOT, TESTS, checkout_env


def launch(launcher: list[str], out, *plans) -> subprocess.Popen:
    env = checkout_env()
    env["PYTHONPATH"] = f"{TESTS}:{env['PYTHONPATH']}"  # rank_probe
    return subprocess.Popen([*launcher, "rank_probe", str(out), *plans], cwd=ROOT, env=env)


def ranks(n=2, port="29517") -> list[str]:
    return [sys.executable, "-m", "llmtrain.launch.ranks", str(n), port]


def recorded(out, n=2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def test_each_rank_gets_what_deepspeeds_launcher_gives_it(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "deepspeed"
    ours.mkdir(), theirs.mkdir()
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                 "--master_addr=127.0.0.1", "--master_port=29517", "--module"]
    assert launch(ranks(), ours).wait(60) == 0 and launch(deepspeed, theirs).wait(60) == 0
    for a, b in zip(recorded(ours), recorded(theirs)):  # argv[1]: each launch's own OUT
        assert a["env"] == b["env"] and a["argv"][0] == b["argv"][0] and a["argv"][2:] == b["argv"][2:]
    assert [r["argv"][0] for r in recorded(ours)] == ["--local_rank=0", "--local_rank=1"]
    code = "import sys, llmtrain.launch.ranks; assert not {'torch', 'deepspeed'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=checkout_env())


def test_a_failing_rank_ends_the_others_with_its_code(tmp_path):
    for plan, code in (("1=exit5", 5), ("1=kill", 128 + signal.SIGKILL)):
        out = tmp_path / plan.replace("=", "-")
        out.mkdir()
        t0 = time.monotonic()
        assert launch(ranks(), out, "0=sleep", plan).wait(60) == code
        assert time.monotonic() - t0 < 20  # not the sleeping rank's two minutes
        assert not psutil.pid_exists(recorded(out)[0]["pid"]), "the sleeping rank outlived the launch"


def test_a_signal_to_the_launcher_ends_every_rank(tmp_path):
    proc = launch(ranks(), tmp_path, "0=sleep", "1=sleep")
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"rank{r}.json").exists() for r in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert not any(psutil.pid_exists(r["pid"]) for r in recorded(tmp_path))
