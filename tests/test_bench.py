"""`bench heads` end to end on a tiny shape: every contender measured in its own process, the
JSON carries the documented fields, and a failing contender is reported, not fatal."""

import json

from typer.testing import CliRunner

from conftest import TESTS
from llmtrain.bench import adaptive_cutoffs, app
from llmtrain.heads import HEADS

TINY = ["--tokens", "48", "--vocab", "200", "--hidden", "16", "--repeats", "2", "--warmup", "1", "--device", "cpu"]


def test_bench_heads_tiny_shape_writes_documented_json(tmp_path, monkeypatch):
    monkeypatch.setitem(HEADS, "broken", "bench_broken_head:BrokenHead")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["heads", *TINY, "--heads", "softmax,cce:chunk_size=16,broken:label_smoothing=0.25",
                                      "--peers", "torch-linear-ce,torch-eager", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["shape"] == {"tokens": 48, "vocab": 200, "hidden": 16}
    assert doc["dtype"] == "fp32" and doc["torch"] and doc["device"].startswith("cpu")
    assert doc["matmul"]["status"] == "ok" and doc["matmul"]["gflops"] > 0 and doc["matmul"]["floor_ms"] > 0
    by_name = {r["name"]: r for r in doc["results"]}
    assert [r["name"] for r in doc["results"]] == ["torch-eager", "torch-linear-ce", "softmax", "cce:chunk_size=16",
                                                   "broken:label_smoothing=0.25"]
    for name in ("torch-eager", "torch-linear-ce", "softmax", "cce:chunk_size=16"):
        r = by_name[name]
        assert r["status"] == "ok", r
        assert len(r["times_ms"]) == 2 and r["time_ms"] > 0 and r["peak_extra_mib"] >= 0
        assert abs(r["time_vs_floor"] - r["time_ms"] / doc["matmul"]["floor_ms"]) < 1e-9
        assert abs(r["time_vs_eager"] - r["time_ms"] / by_name["torch-eager"]["time_ms"]) < 1e-9
    broken = by_name["broken:label_smoothing=0.25"]
    assert broken["status"] == "failed"
    assert "forward refused (label_smoothing=0.25)" in broken["note"]  # the options reached the worker
    assert "failed" in result.output


def test_bench_rejects_unknown_names_and_dtype():
    result = CliRunner().invoke(app, ["heads", *TINY, "--peers", "torch-eagre"])
    assert result.exit_code != 0 and "torch-eagre" in result.output and "--peers" in result.output
    result = CliRunner().invoke(app, ["heads", *TINY, "--dtype", "fp16"])
    assert result.exit_code != 0 and "--dtype" in result.output
    for bad, named in (("cce:chunk_size=0", "chunk_size"), ("cce:chunk_size", "key=value"), ("cec:chunk_size=8", "cec")):
        result = CliRunner().invoke(app, ["heads", *TINY, "--heads", bad])
        assert result.exit_code != 0 and named in result.output and "--heads" in result.output, result.output


def test_adaptive_cutoffs_start_at_sqrt_vocab_and_stay_inside():
    for vocab in (200, 65536, 256000):
        cuts = adaptive_cutoffs(vocab)
        assert cuts[0] ** 2 >= vocab > (cuts[0] - 1) ** 2
        assert cuts == sorted(cuts) and cuts[-1] < vocab


def test_bench_baseline_runs_each_head_from_another_source_tree(tmp_path):
    """--baseline: the same head from an earlier source tree, side by side. The baseline tree
    here is a copy of this one whose softmax head refuses to run, so the row must come from it."""
    import shutil

    from pathlib import Path

    import llmtrain

    root = tmp_path / "before"
    shutil.copytree(Path(llmtrain.__file__).parent, root / "llmtrain")
    softmax = root / "llmtrain" / "heads" / "softmax.py"
    softmax.write_text(softmax.read_text().replace("        check_head_inputs(hidden, targets, self.hidden_size)\n        logits",
                                                   "        raise RuntimeError('baseline tree')\n        logits", 1))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["heads", *TINY, "--heads", "softmax", "--peers", "", "--baseline", str(root),
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    by_name = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert by_name["softmax"]["status"] == "ok"
    assert by_name["softmax@baseline"]["status"] == "failed" and "baseline tree" in by_name["softmax@baseline"]["note"]
    result = CliRunner().invoke(app, ["heads", *TINY, "--baseline", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "--baseline" in result.output


def test_a_peer_that_cannot_run_here_is_skipped_with_the_reason(monkeypatch):
    from llmtrain import bench

    installed = {"cut_cross_entropy", "liger_kernel"}
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    unavailable = {(name, device): bench._peer_unavailable({"name": name, "device": device})
                   for name in bench.PEERS for device in ("cpu", "cuda")}
    assert unavailable.pop(("liger", "cpu")) == "Liger's kernels need CUDA"
    assert set(unavailable.values()) == {None}  # everything else runs where its package is installed
    installed.clear()
    assert bench._peer_unavailable({"name": "liger", "device": "cuda"}) == "liger-kernel is not installed"
    for name in ("apple-cce", "apple-cce-compile"):
        assert bench._peer_unavailable({"name": name, "device": "cuda"}) == "cut-cross-entropy is not installed"
