"""Data at scale: parallel tokenization into bounded uint32 shards with a document index, resume of
an interrupted preparation, shard integrity, the chunked sampler and document masking. Training on
many small shards, stopped and resumed exactly: test_matrix_e2e's zero0 cell."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, checkout_env, llmtrain
from test_data import SEQ_LEN, configs, write_corpus
from llmtrain.data import encode
from llmtrain.data.packing import load_split
from llmtrain.data.prepare import prepare_data
from llmtrain.data.sampler import ResumableSampler
from llmtrain.data.shards import ShardWriter, TokenShards
from llmtrain.data.sources import split_documents, Document
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import UserError
from llmtrain.model.decoder import Body, document_layout
from llmtrain.recipe import ModelConfig, validate_recipe

SHARD = 1024  # tokens: the smallest shard a recipe allows, so a small corpus spans many


def quiet(_):
    pass


def reference_streams(prep, corpus: Path) -> dict[str, list[list[int]]]:
    """Per split, each document's ids + eos, by the tokenizer encoding it alone, in name order."""
    tok = load_tokenizer(prep.tokenizer_path)
    docs = [Document(p.name, p.read_bytes().decode("utf-8")) for p in sorted(corpus.glob("*.txt"))]
    train, val = split_documents(docs, 0.2)
    return {split: [tok.encode(d.text, add_special_tokens=False).ids + [prep.eos_id] for d in part]
            for split, part in (("train", train), ("val", val))}


def split_files(path: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def test_shards_are_bounded_and_indexed_and_parallel_equals_serial(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    dcfg, tcfg = configs(tmp_path, tmp_path / "corpus", {"shard_tokens": SHARD})
    serial = prepare_data(dcfg, tcfg, SEQ_LEN, log=quiet)
    expected = reference_streams(serial, tmp_path / "corpus")
    for split, path in (("train", serial.train_path), ("val", serial.val_path)):
        manifest = json.loads((Path(path) / "shards.json").read_text())
        sizes = [s["tokens"] for s in manifest["shards"]]
        assert max(sizes) == SHARD and all(n == SHARD for n in sizes[:-1]) and 0 < sizes[-1] <= SHARD
        tokens = np.concatenate([np.fromfile(Path(path) / s["file"], dtype="<u4") for s in manifest["shards"]])
        assert tokens.tolist() == sum(expected[split], [])
        ends = np.concatenate([np.fromfile(Path(path) / s["index"], dtype="<i8") for s in manifest["shards"]])
        assert ends.tolist() == np.cumsum([len(d) for d in expected[split]]).tolist()
        for s in manifest["shards"]:  # each shard's index holds the documents that end inside it
            bounds = sum(sizes[: int(s["file"][:5])]), sum(sizes[: int(s["file"][:5]) + 1])
            index = np.fromfile(Path(path) / s["index"], dtype="<i8")
            assert ((index > bounds[0]) & (index <= bounds[1])).all()
            assert s["sha256"] == hashlib.sha256((Path(path) / s["file"]).read_bytes()).hexdigest()
    # Two processes, batches small enough that the pool is used: the same bytes.
    pools = []
    real_context = encode.multiprocessing.get_context
    monkeypatch.setattr(encode.multiprocessing, "get_context", lambda m: pools.append(m) or real_context(m))
    monkeypatch.setattr(encode, "BATCH_BYTES", 8_000)
    pdcfg, _ = configs(tmp_path / "p", tmp_path / "corpus", {"shard_tokens": SHARD, "num_proc": 2})
    parallel = prepare_data(pdcfg, tcfg, SEQ_LEN, log=quiet)
    assert pools == ["spawn"]
    assert split_files(parallel.train_path) == split_files(serial.train_path)
    assert split_files(parallel.val_path) == split_files(serial.val_path)


@pytest.mark.parametrize("where", ["_close", "_write"])  # after a shard's bytes, or inside a shard
def test_interrupted_preparation_resumes_after_its_last_shard(tmp_path, monkeypatch, where):
    write_corpus(tmp_path / "corpus")
    dcfg, tcfg = configs(tmp_path, tmp_path / "corpus", {"shard_tokens": SHARD})
    clean = prepare_data(dcfg.model_copy(update={"cache_dir": str(tmp_path / "clean")}), tcfg, SEQ_LEN, log=quiet)

    real = getattr(ShardWriter, where)
    calls = {"n": 0}

    def dies_on_the_seventh(self, *a):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(ShardWriter, where, dies_on_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(dcfg, tcfg, SEQ_LEN, log=quiet)
    assert not list((tmp_path / "cache" / "tokens").glob("*[0-9a-f]"))  # nothing counts as done
    monkeypatch.setattr(ShardWriter, where, real)
    encoded = []
    real_encode = encode.encode
    monkeypatch.setattr(encode, "encode", lambda texts: encoded.extend(texts) or real_encode(texts))
    messages = []
    resumed = prepare_data(dcfg, tcfg, SEQ_LEN, log=messages.append)
    assert any("resuming an interrupted preparation after" in m for m in messages)
    assert 0 < len(encoded) < 40  # documents of the closed shards were not tokenized again
    assert split_files(resumed.train_path) == split_files(clean.train_path)
    assert split_files(resumed.val_path) == split_files(clean.val_path)
    assert np.array_equal(np.load(resumed.counts_path), np.load(clean.counts_path))
    assert not list((tmp_path / "cache" / "tokens").glob("*.partial"))


@pytest.mark.slow
def test_killed_preparation_resumes_through_the_cli(tmp_path, recipe):
    """SIGKILL the CLI while it writes shards; the next run continues and ends with the same shards."""
    over = [f"data.cache_dir={tmp_path / 'cache'}", "data.shard_tokens=8192", "data.max_bytes=1500000",
            "data.num_proc=1"]
    cmd = [sys.executable, "-m", "llmtrain.cli", "run", str(recipe), *over, "--prepare-only", "--out"]
    proc = subprocess.Popen([*cmd, str(tmp_path / "a")], cwd=ROOT, env=checkout_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache" / "tokens").glob("*.partial/progress.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "preparation ended before a shard closed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    second = llmtrain("run", recipe, *over, "--prepare-only", "--out", tmp_path / "b")
    assert "resuming an interrupted preparation after" in second.stderr
    clean = llmtrain("run", recipe, *over[1:], f"data.cache_dir={tmp_path / 'clean'}", "--prepare-only",
                     "--out", tmp_path / "c")
    assert "resuming" not in clean.stderr
    resumed, fresh = (json.loads((tmp_path / r / "data.json").read_text()) for r in "bc")
    for split in ("train_path", "val_path"):
        assert split_files(resumed[split]) == split_files(fresh[split])


def test_damaged_shards_are_found_and_rebuilt(tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=12)
    dcfg, tcfg = configs(tmp_path, tmp_path / "corpus", {"shard_tokens": SHARD})
    prep = prepare_data(dcfg, tcfg, SEQ_LEN, log=quiet)
    good = split_files(prep.train_path)
    shard = Path(prep.train_path) / "00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01  # one bit: the size is right, the checksum is not
    shard.write_bytes(bytes(data))
    messages = []
    again = prepare_data(dcfg, tcfg, SEQ_LEN, log=messages.append)
    assert any(f"damaged shard {shard}: sha256 does not match" in m and "tokenizing again" in m for m in messages)
    assert split_files(again.train_path) == good
    # A truncated shard is refused by a rank, naming the file, before any step.
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match=f"damaged shard {shard}: 10 bytes, the manifest says 4,096"):
        load_split(prep.train_path, SEQ_LEN + 1)


def test_token_ids_are_checked_against_the_vocabulary(tmp_path):
    writer = ShardWriter(tmp_path / "train", SHARD, vocab_size=10)
    writer.append(np.array([1, 9], dtype=np.uint32), np.array([2]))
    with pytest.raises(UserError, match=r"token id 12 is outside the vocabulary of 10 \(writing .*00000.bin\)"):
        writer.append(np.array([3, 12, 9], dtype=np.uint32), np.array([3]))


def test_blocks_cross_shard_boundaries(tmp_path):
    stream = np.arange(5000, dtype=np.uint32) % 997
    writer = ShardWriter(tmp_path / "s", SHARD, vocab_size=997)
    writer.append(stream[:1500], np.array([1500]))
    writer.append(stream[1500:], np.array([3500]))
    writer.finish()
    assert len(TokenShards(tmp_path / "s")) == 5000 and len(TokenShards(tmp_path / "s").maps) == 5
    blocks = load_split(tmp_path / "s", 300)
    assert len(blocks) == 16
    for b in (0, 3, 6, 13, 15):  # 3 and 6 cross a boundary (1024, 2048)
        assert blocks[[b]][0].tolist() == stream[b * 300:(b + 1) * 300].tolist()


def test_a_bad_input_through_the_cli_is_one_line_and_exit_2(tmp_path, recipe):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "wrong key"}\n')
    proc = llmtrain("run", recipe, f"data.source={tmp_path / 'j'}", f"data.cache_dir={tmp_path / 'c'}",
                    "--prepare-only", "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.text_field: {tmp_path / 'j' / 'a.jsonl'}:3 has no 'text' field (found ['txt'])")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- sampler over chunks


def test_chunked_sampler_visits_every_block_once_and_resumes():
    n, chunk = 1000, 64  # 16 chunks, the last one short
    sampler = ResumableSampler(n, 5, 0, 1, seed=3, chunk_blocks=chunk)
    epochs = [[i for _ in range(200) for i in sampler.next_indices()] for _ in range(2)]
    assert sorted(epochs[0]) == list(range(n)) and sorted(epochs[1]) == list(range(n)) and epochs[0] != epochs[1]
    assert sampler._chunk[2].numel() <= chunk  # no array of the corpus's length
    # The walk finishes one chunk before the next, and visits the chunks in a shuffled order.
    chunks = [b // chunk for b in epochs[0]]
    visits = [c for i, c in enumerate(chunks) if i == 0 or c != chunks[i - 1]]
    assert sorted(visits) == list(range(16)) and visits != sorted(visits)
    # Exact resume on the same world size, and the same global order on another.
    two = [ResumableSampler(n, 3, r, 2, seed=9, chunk_blocks=chunk) for r in range(2)]
    reference = [sum((s.next_indices() for s in two), []) for _ in range(300)]
    two = [ResumableSampler(n, 3, r, 2, seed=9, chunk_blocks=chunk) for r in range(2)]
    head = [sum((s.next_indices() for s in two), []) for _ in range(100)]
    state = json.loads(json.dumps(two[0].state_dict()))
    again = [ResumableSampler(n, 3, r, 2, seed=9, chunk_blocks=chunk) for r in range(2)]
    for s in again:
        s.load_state_dict(state)
    assert head + [sum((s.next_indices() for s in again), []) for _ in range(200)] == reference
    one = ResumableSampler(n, 6, 0, 1, seed=9, chunk_blocks=chunk)
    one.load_state_dict(state)
    assert [one.next_indices() for _ in range(200)] == reference[100:]


# ---------------------------------------------------------------- document mask


def test_document_layout_against_a_loop():
    ids = torch.tensor([[5, 1, 0, 7, 0, 0, 3, 2], [0, 4, 4, 4, 4, 0, 9, 9]])
    positions, mask = document_layout(ids, eos=0)
    for b in range(2):
        doc, pos, docs, expected_pos = 0, 0, [], []
        for t, token in enumerate(ids[b].tolist()):
            docs.append(doc)
            expected_pos.append(pos)
            pos += 1
            if token == 0:
                doc, pos = doc + 1, 0
        assert positions[b].tolist() == expected_pos
        for q in range(8):
            for k in range(8):
                assert bool(mask[b, 0, q, k]) == (k <= q and docs[k] == docs[q])


def test_document_mask_equals_each_document_run_alone():
    cfg = ModelConfig(layers=2, d_model=32, n_heads=4, seq_len=24)
    torch.manual_seed(0)
    body = Body(cfg, vocab_size=50).double().eval()
    eos = 49
    docs = [torch.randint(0, 49, (n,)) for n in (6, 1, 9)]
    packed = torch.cat([torch.cat([d, torch.tensor([eos])]) for d in docs] + [torch.randint(0, 49, (5,))])[None]
    alone = [body(torch.cat([d, torch.tensor([eos])])[None])[0] for d in docs] + [body(packed[:, -5:])[0]]
    plain = body(packed)[0]
    body.document_eos = eos
    masked = body(packed)[0]
    torch.testing.assert_close(masked, torch.cat(alone), rtol=0, atol=1e-12)
    assert (masked[7:] - plain[7:]).abs().max() > 1e-3  # without the mask the later documents see the earlier
    torch.testing.assert_close(masked[:7], plain[:7], rtol=0, atol=1e-12)


def test_document_mask_is_refused_for_hugging_face_bodies(tmp_path):
    from hf_models import save_tiny_model

    folder = save_tiny_model(tmp_path / "llama", "llama", weights=False)
    with pytest.raises(UserError, match="data.document_mask: not supported with model.hf"):
        validate_recipe({"model": {"hf": str(folder)}, "data": {"document_mask": True}})
    validate_recipe({"model": {"hf": str(folder)}, "data": {"document_mask": False}})


def test_bounded_tokenizer_sample_is_the_sorted_corpus_capped():
    import random

    from llmtrain.data.sources import LowestHashSample, cap_bytes, unit_hash

    rng = random.Random(0)
    docs = [Document(f"d{i}", "x" * rng.randint(1, 300)) for i in range(400)]
    for cap in (1, 250, 5_000, 30_000, 10**6):
        sample = LowestHashSample(cap)
        for d in docs:
            sample.add(d, len(d.text))
        reference = [d for d, _ in cap_bytes(sorted(docs, key=lambda d: unit_hash(d.name)), cap)]
        assert [d for d, _ in cap_bytes(sample.documents(), cap)] == reference
        assert sum(len(d.text) for d in sample.documents()) < cap + 300  # bounded by the cap and one document


def test_a_split_in_the_old_arrow_format_gets_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "data-00000-of-00001.arrow").write_bytes(b"old blocks")
    with pytest.raises(UserError, match=r"Arrow blocks written by an older llmtrain: run `llmtrain run RECIPE --out RUN "
                                        r"--resume auto` to prepare the data again"):
        load_split(tmp_path / "train", SEQ_LEN + 1)
