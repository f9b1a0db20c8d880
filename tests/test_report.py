"""llmtrain compare on run folders whose metrics.jsonl the test writes: the table's numbers against
values computed here from the records (numpy), every plot a PNG of the stated size, resumed, short,
running and eval-less runs, and folders that are not runs (exit 2, the folder named)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, llmtrain
from llmtrain.recipe import load_recipe
from llmtrain.report.index import compare_runs
from llmtrain.report.plots import SIZE
from llmtrain.report.runs import read_run
from llmtrain.report.table import table_rows
from llmtrain.train.status import write_status

TOKENS_PER_STEP = 2048


def make_run(path, head, train, evals, state="complete", steps=None, resumed_at=None, more=()):
    """A run folder: the tiny recipe with `head`, train records {step: (loss, train_s, tokens/s,
    peak, mfu)}, eval records {step: (train_s, val dict)}; `resumed_at`: the records from that
    step on are logged twice, first by an abandoned attempt with other values."""
    path.mkdir(parents=True)
    overrides = [f"head.type={head}", f"train.steps={steps or max(train)}", *more]
    (path / "recipe.resolved.yaml").write_text(load_recipe(ROOT / "recipes" / "tiny.yaml", overrides).to_yaml())
    lines = []
    def log(step, abandoned=False):
        if step in train:
            loss, seconds, rate, peak, mfu = train[step]
            lines.append({"step": step, "loss": loss + (5 if abandoned else 0), "tokens_seen": step * TOKENS_PER_STEP,
                          "train_s": seconds, "tokens_per_s": rate, "peak_mem_bytes": peak, "mfu": mfu})
        if step in evals:
            seconds, values = evals[step]
            lines.append({"step": step, "train_s": seconds,
                          **{k: v + (9 if abandoned else 0) for k, v in values.items()}})
    steps_logged = sorted(set(train) | set(evals))
    if resumed_at is not None:  # the abandoned attempt's records, then the resumed one's
        for step in steps_logged:
            log(step, abandoned=step >= resumed_at)
        steps_logged = [s for s in steps_logged if s >= resumed_at]
    for step in steps_logged:
        log(step)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_status(path, state, step=max(train) if train else None, steps=steps or max(train))
    return path


def dist(loss, top1):
    return {"val_loss": loss, "val_ppl": float(np.exp(loss)), "val_bpb": loss / np.log(2) / 3.5,
            "val_top1": top1, "val_top5": top1 + 0.1, "val_top10": top1 + 0.2}


@pytest.fixture
def runs(tmp_path):
    long = make_run(tmp_path / "softmax", "softmax",
                    {s: (8 - s / 10, s * 1.0, 1000 + s, 2**20 * s, 0.01 * s) for s in range(10, 61, 10)},
                    {20: (20.0, dist(6.0, 0.1)), 40: (40.0, dist(5.0, 0.2)), 60: (60.0, dist(5.2, 0.25))},
                    resumed_at=40)
    short = make_run(tmp_path / "hsm", "hsm", {s: (7 - s / 10, s * 0.5, 2000.0 + s, 2**19, 0.02) for s in (10, 20, 30, 40)},
                     {20: (10.0, dist(5.5, 0.15)), 40: (25.0, dist(4.5, 0.3))})
    zloss = make_run(tmp_path / "zloss", "zloss", {s: (1.0, s * 0.6, 1500.0, 2**18, 0.03) for s in (10, 20, 30, 40, 50)},
                     {25: (15.0, {"val_top1": 0.12, "val_top5": 0.3, "val_top10": 0.4}),
                      50: (30.0, {"val_top1": 0.22, "val_top5": 0.4, "val_top10": 0.5})}, steps=50)
    # still going, with an evaluation earlier than anyone's last: it must not set T
    going = make_run(tmp_path / "going", "cce", {10: (7.5, 3.0, 900.0, 2**21, 0.05)}, {10: (3.0, dist(7.0, 0.01))},
                     state="running", steps=100)
    stopped = make_run(tmp_path / "stopped", "cce", {10: (7.6, 3.5, 800.0, 2**21, 0.04)}, {}, state="stopped", steps=100)
    return [long, short, zloss, going, stopped]


def test_table_numbers_come_from_the_latest_attempts_records(runs, tmp_path):
    titles, rows, seconds = table_rows([read_run(p) for p in runs])
    table = [dict(zip(titles, row)) for row in rows]
    # T: the shortest finished run's last evaluation (hsm, 25 s); the running run does not set it
    assert seconds == 25.0
    softmax, hsm, zloss, going, stopped = table
    # the resumed run: only the resumed attempt's records from step 40 on
    evals = {20: (20.0, 6.0), 40: (40.0, 5.0), 60: (60.0, 5.2)}
    assert softmax["val loss"] == 5.2 and softmax["best val loss"] == 5.0
    assert softmax["bits/byte"] == pytest.approx(5.2 / np.log(2) / 3.5)
    assert softmax["best bits/byte"] == pytest.approx(5.0 / np.log(2) / 3.5)
    xs = [t for t, _ in evals.values()]
    assert softmax["bits/byte @T"] == pytest.approx(np.interp(25.0, xs, [l / np.log(2) / 3.5 for _, l in evals.values()]))
    assert softmax["top-1 @T"] == pytest.approx(np.interp(25.0, xs, [0.1, 0.2, 0.25]))
    assert softmax["ppl"] == pytest.approx(np.exp(5.2)) and softmax["top-10"] == pytest.approx(0.45)
    assert softmax["tokens/s"] == np.median([1000 + s for s in range(20, 61, 10)])  # the first window left out
    assert softmax["MFU"] == pytest.approx(np.median([0.01 * s for s in range(20, 61, 10)]))
    assert softmax["peak mem/rank"] == 2**20 * 60 and softmax["steps"] == "60/60"
    assert softmax["tokens"] == 60 * TOKENS_PER_STEP and softmax["train s"] == 60.0
    assert hsm["bits/byte @T"] == pytest.approx(4.5 / np.log(2) / 3.5)  # T is its own last evaluation
    # zloss: no distribution columns; its top-1 interpolated at T
    assert zloss["val loss"] is None and zloss["ppl"] is None and zloss["bits/byte"] is None
    assert zloss["top-1"] == 0.22 and zloss["top-1 @T"] == pytest.approx(np.interp(25.0, [15, 30], [0.12, 0.22]))
    assert zloss["head"] == "zloss"
    # the running run: what it has logged; past its last evaluation at T
    assert going["state"] == "running" and going["steps"] == "10/100" and going["val loss"] == 7.0
    assert going["bits/byte @T"] is None and going["tokens/s"] == 900.0
    # the stopped run without an evaluation
    assert stopped["state"] == "stopped, no eval" and stopped["val loss"] is None and stopped["top-1"] is None


def test_report_files_and_plots(runs, tmp_path):
    index = compare_runs(runs, tmp_path / "report")
    text = index.read_text()
    pictures = sorted((tmp_path / "report").glob("*.png"))
    assert [p.name for p in pictures] == sorted(["bpb_vs_tokens.png", "bpb_vs_seconds.png", "top1_vs_tokens.png",
                                                 "loss_vs_steps.png", "throughput.png"])
    for picture in pictures:
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(picture) as image:
            image.verify()
        with Image.open(picture) as image:
            assert image.size == SIZE, picture.name
            # something was drawn besides axes: more than a handful of colours
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
        assert f"]({picture.name})" in text
    assert "going is still running" in text and "stopped has no evaluation" in text
    assert "zloss (zloss) is not a probability model" in text
    assert "`head.type`: softmax = softmax, hsm = hsm, zloss = zloss, going = cce, stopped = cce" in text
    assert (tmp_path / "report" / "table.md").read_text() in text


def test_compare_command_and_its_errors(runs, tmp_path):
    done = llmtrain("compare", *runs[:2], "--out", tmp_path / "cli")
    assert "| softmax | softmax |" in done.stdout and (tmp_path / "cli" / "index.md").is_file()
    stray = tmp_path / "not-a-run"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    for args, words in (((runs[0], stray), [str(stray), "not a run folder"]),
                        ((tmp_path / "missing",), [str(tmp_path / "missing"), "no such folder"]),
                        ((runs[0], runs[0]), ["named twice"])):
        proc = llmtrain("compare", *args, "--out", tmp_path / "bad", check=False)
        assert proc.returncode == 2, proc.stderr
        assert all(w in proc.stderr for w in words) and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()  # nothing written
    # damage in the middle of metrics.jsonl names the file and line; a torn last line is skipped
    lines = (runs[1] / "metrics.jsonl").read_text().splitlines()
    (runs[1] / "metrics.jsonl").write_text("\n".join(lines + ['{"step": 4']) + "\n")
    assert len(read_run(runs[1]).train) == 4
    (runs[1] / "metrics.jsonl").write_text("\n".join(lines[:2] + ["garbage"] + lines[2:]) + "\n")
    proc = llmtrain("compare", runs[1], "--out", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "metrics.jsonl: line 3 is not JSON" in proc.stderr


def test_tempnet_columns_only_where_a_run_has_the_network(runs, tmp_path):
    titles, _, _ = table_rows([read_run(p) for p in runs])
    assert not any("τ" in t for t in titles)
    tau = {"val_loss_tau": 4.0, "val_ppl_tau": float(np.exp(4.0)), "val_tau_mean": 1.5, "val_tau_min": 0.7,
           "val_tau_max": 2.25}
    tempnet = make_run(tmp_path / "tempnet", "cce", {10: (9.0, 5.0, 700.0, 2**22, 0.01)},
                       {10: (5.0, {**dist(4.2, 0.2), **tau})}, steps=20, more=["temperature.enabled=true"])
    titles, rows, _ = table_rows([read_run(p) for p in (runs[0], tempnet)])
    softmax, row = (dict(zip(titles, r)) for r in rows)
    assert row["ppl @τ"] == pytest.approx(np.exp(4.0)) and softmax["ppl @τ"] is None
    assert row["bits/byte @τ"] == pytest.approx(4.0 / np.log(2) / 3.5)  # the same 3.5 bytes per token
    assert row["τ mean [min, max]"] == "1.50 [0.70, 2.25]"
    assert row["head"] == "cce + TempNet (joint)"
