"""Data: sources, tokenizer, packing, split, cache and the resumable sampler, on small corpora."""

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmtrain.data import prepare, sources, tokenizer
from llmtrain.data.packing import load_split
from llmtrain.data.prepare import PreparedData, prepare_data
from llmtrain.data.sampler import ResumableSampler
from llmtrain.data.sources import iter_documents, scan_corpus, split_documents, stdlib_files
from llmtrain.data.tokenizer import EOS_TOKEN, token_bytes, train_tokenizer
from llmtrain.errors import UserError
from llmtrain.recipe import DataConfig, TokenizerConfig

UNICODE_TEXTS = [
    "héllo wörld — naïve café",
    "日本語のテキストと中文字符",
    "emoji 🦙🚀 and flags 🇫🇷, zero-width\u200bjoiner 👩‍💻",
    "e\u0301 combining accents, Ελληνικά, русский, עברית, العربية",
    "tabs\tand\r\nwindows newlines\n\n   indented\x00nul",
]
SEQ_LEN = 31


def stdlib_texts(n: int, skip: int = 0) -> list[str]:
    """n real stdlib source files (UTF-8 ones), starting after `skip`."""
    texts = []
    for _, path in stdlib_files()[skip:]:
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
        if len(texts) == n:
            return texts
    return texts


def gpt2_byte_decoder() -> dict[str, int]:
    """Reference: OpenAI GPT-2 encoder.py's bytes_to_unicode, inverted (character → byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = stdlib_texts(40, skip=100) + UNICODE_TEXTS
    return train_tokenizer(texts, vocab_size=400, min_frequency=2)


def write_corpus(root: Path, n_docs: int = 40) -> list[str]:
    """n_docs .txt files of real stdlib text (a slice each) and unicode; returns their texts by name order."""
    root.mkdir(parents=True, exist_ok=True)
    sources = stdlib_texts(n_docs)
    texts = []
    for i in range(n_docs):
        text = sources[i][:3000] + "\n" + UNICODE_TEXTS[i % len(UNICODE_TEXTS)]
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8", newline="")
        texts.append(text)
    return texts


def configs(tmp_path: Path, source: Path | str, data: dict | None = None, **tok) -> tuple[DataConfig, TokenizerConfig]:
    data = {"source": str(source), "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache"), "num_proc": 1,
            **(data or {})}
    return DataConfig(**data), TokenizerConfig(**{"vocab_size": 400, **tok})


def read_corpus(cfg: DataConfig, log=lambda m: None) -> tuple[list, str]:
    """The documents of a small corpus as a list, and its content hash."""
    return list(iter_documents(cfg)), scan_corpus(cfg, log=log).hash


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_stdlib_and_unicode(small_tokenizer):
    tok = small_tokenizer
    assert tok.get_vocab_size() == 400
    assert tok.token_to_id(EOS_TOKEN) == 399
    for text in stdlib_texts(5, skip=300) + UNICODE_TEXTS:  # files the tokenizer did not see
        ids = tok.encode(text, add_special_tokens=False).ids
        assert max(ids) < 399  # ordinary text never produces the eos id
        assert tok.decode(ids) == text


def test_token_bytes_matches_gpt2_byte_map_and_text_lengths(small_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    small_tokenizer.save(str(path))
    counts = token_bytes(path)
    assert counts.dtype == torch.int64 and counts.shape == (400,)
    byte_of = gpt2_byte_decoder()
    eos = small_tokenizer.token_to_id(EOS_TOKEN)
    for i in range(400):
        if i == eos:
            assert counts[i] == 0
            continue
        raw = bytes(byte_of[c] for c in small_tokenizer.id_to_token(i))
        assert counts[i] == len(raw)
        try:  # where the token is whole UTF-8 on its own, decode agrees
            assert counts[i] == len(raw.decode("utf-8").encode("utf-8")) == len(small_tokenizer.decode([i]).encode())
        except UnicodeDecodeError:
            pass
    for text in stdlib_texts(3, skip=300) + UNICODE_TEXTS:
        ids = small_tokenizer.encode(text, add_special_tokens=False).ids + [eos]
        assert int(counts[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_of_a_word_level_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "wörld", "日本", "<0x41>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="hello"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS_TOKEN])
    tok.add_tokens(["añadido"])  # a user-added, non-special token counts its own bytes
    tok.save(str(tmp_path / "words.json"))
    # Decoded lengths, a byte-fallback token as its single byte, the eos as nothing.
    assert token_bytes(tmp_path / "words.json").tolist() == [5, 6, 6, 1, 0, len("añadido".encode())]


# ---------------------------------------------------------------- packing, split, cache


def reference_split(names: list[str], val_fraction: float) -> set[str]:
    """Validation names per the documented rule: first 8 bytes of sha256(name) / 2**64 < fraction."""
    return {n for n in names
            if int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") / 2**64 < val_fraction}


def test_packing_matches_eos_joined_stream(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    names = [f"doc{i:03d}.txt" for i in range(len(texts))]
    dcfg, tcfg = configs(tmp_path, tmp_path / "corpus")
    prep = prepare_data(dcfg, tcfg, SEQ_LEN, log=lambda m: None)
    val_names = reference_split(names, 0.2)
    assert 0 < len(val_names) < len(names)  # the corpus exercises both sides without fallback

    tok = tokenizer.load_tokenizer(prep.tokenizer_path)
    assert prep.eos_id == tok.token_to_id(EOS_TOKEN) and prep.vocab_size == tok.get_vocab_size()
    for split_path, keep in ((prep.train_path, lambda n: n not in val_names), (prep.val_path, lambda n: n in val_names)):
        stream = []
        for name, text in zip(names, texts):
            if keep(name):
                stream += tok.encode(text, add_special_tokens=False).ids + [prep.eos_id]
        blocks = load_split(split_path, SEQ_LEN + 1)
        n = len(stream) // (SEQ_LEN + 1)
        assert len(blocks) == n and blocks[:].dtype == torch.int64 and blocks[:].shape == (n, SEQ_LEN + 1)
        assert blocks[:].reshape(-1).tolist() == stream[: n * (SEQ_LEN + 1)]
        assert blocks[[n - 1, 0]].tolist() == [stream[(n - 1) * (SEQ_LEN + 1): n * (SEQ_LEN + 1)], stream[: SEQ_LEN + 1]]
        on_disk = np.concatenate([np.fromfile(f, dtype="<u4") for f in sorted(Path(split_path).glob("*.bin"))])
        assert on_disk.tolist() == stream  # raw little-endian uint32, the whole stream with its tail
        if split_path == prep.train_path:
            assert prep.n_train_tokens == len(stream) and prep.n_train_blocks == n
            counts = np.load(prep.counts_path)
            assert counts.dtype == np.int64 and counts.shape == (prep.vocab_size,)
            assert np.array_equal(counts, np.bincount(np.array(stream[: n * (SEQ_LEN + 1)]), minlength=prep.vocab_size))
        else:
            assert prep.n_val_blocks == n
    assert PreparedData.from_json(prep.to_json()) == prep


def test_split_is_deterministic_disjoint_and_seed_free():
    docs = [sources.Document(f"file{i}.py", f"text {i}") for i in range(2000)]
    train, val = split_documents(docs, 0.1)
    names = {d.name for d in docs}
    assert {d.name for d in train} | {d.name for d in val} == names
    assert not {d.name for d in train} & {d.name for d in val}
    assert {d.name for d in val} == reference_split(sorted(names), 0.1)
    assert abs(len(val) / len(docs) - 0.1) < 0.03  # binomial sd is 0.0067
    # Order and other documents do not move a document between sides.
    _, val_shuffled = split_documents(list(reversed(docs)) + [sources.Document("new.py", "x")], 0.1)
    assert {d.name for d in val_shuffled} - {"new.py"} == {d.name for d in val}


def test_split_keeps_one_document_on_each_side():
    docs = [sources.Document(f"d{i}", "x") for i in range(3)]
    train, val = split_documents(docs, 0.01)
    assert len(val) >= 1 and len(train) >= 1 and len(train) + len(val) == 3


def test_second_prepare_reuses_the_cache(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus", n_docs=12)
    dcfg, tcfg = configs(tmp_path, tmp_path / "corpus")
    calls = {"train": 0, "encode": 0}
    real_train, real_tokenize = tokenizer.train_tokenizer, prepare.tokenize_corpus

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(tokenizer, "train_tokenizer", counting("train", real_train))
    monkeypatch.setattr(prepare, "tokenize_corpus", counting("encode", real_tokenize))
    first = prepare_data(dcfg, tcfg, SEQ_LEN, log=lambda m: None)
    assert calls == {"train": 1, "encode": 1}
    mtime = Path(first.tokenizer_path).stat().st_mtime_ns
    second = prepare_data(dcfg, tcfg, SEQ_LEN, log=lambda m: None)
    assert second == first and calls == {"train": 1, "encode": 1}
    assert Path(first.tokenizer_path).stat().st_mtime_ns == mtime
    # A new seq_len reads the same shards as other blocks; new text retrains the tokenizer.
    third = prepare_data(dcfg, tcfg, SEQ_LEN + 8, log=lambda m: None)
    assert calls == {"train": 1, "encode": 1} and third.train_path == first.train_path
    assert third.n_train_blocks == first.n_train_tokens // (SEQ_LEN + 9) and third.counts_path != first.counts_path
    (tmp_path / "corpus" / "extra.txt").write_text("def extra():\n    return 1\n")
    fourth = prepare_data(dcfg, tcfg, SEQ_LEN, log=lambda m: None)
    assert calls == {"train": 2, "encode": 2} and fourth.corpus_hash != first.corpus_hash


# ---------------------------------------------------------------- sources


def test_stdlib_source_lists_sorted_stdlib_py_files():
    files = stdlib_files()
    names = [n for n, _ in files]
    assert names == sorted(names) and "os.py" in names and "json/decoder.py" in names
    assert all(n.endswith(".py") and "site-packages" not in n and "dist-packages" not in n for n in names)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(p == root / n for n, p in files)


def test_stdlib_source_with_max_bytes(tmp_path):
    cfg = DataConfig(source="stdlib", max_bytes=200_000)
    docs, _ = read_corpus(cfg, log=lambda m: None)
    total = sum(len(d.text.encode()) for d in docs)
    assert 200_000 - 3 <= total <= 200_000  # the last document is cut to fit, at a character boundary
    expected = [t for t in stdlib_texts(len(docs) + 20) if t]  # sorted order, empty files skipped
    assert [d.text for d in docs[:-1]] == expected[: len(docs) - 1]
    assert expected[len(docs) - 1].startswith(docs[-1].text) and docs[-1].text != expected[len(docs) - 1]


def test_jsonl_parquet_glob_and_hidden_files(tmp_path):
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.jsonl").write_text('{"body": "first doc"}\n\n{"body": "second doc", "id": 2}\n{"body": ""}\n')
    pq.write_table(pa.table({"body": ["third doc", None, "fourth doc"]}), root / "sub" / "b.parquet")
    (root / "sub" / "c.txt").write_text("fifth doc")
    (root / ".hidden" / "d.txt").write_text("hidden doc")
    (root / "e.md").write_text("not a source")
    docs, _ = read_corpus(DataConfig(source=str(root), text_field="body"), log=lambda m: None)
    assert [(d.name, d.text) for d in docs] == [
        ("a.jsonl:1", "first doc"), ("a.jsonl:3", "second doc"),
        ("sub/b.parquet:0", "third doc"), ("sub/b.parquet:2", "fourth doc"), ("sub/c.txt", "fifth doc")]
    docs, _ = read_corpus(DataConfig(source=str(root / "**" / "*.txt")), log=lambda m: None)
    assert [d.text for d in docs] == ["fifth doc"]


def test_undecodable_files_are_skipped(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "good.py").write_text("x = 1\n")
    (tmp_path / "c" / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
    messages = []
    docs, _ = read_corpus(DataConfig(source=str(tmp_path / "c")), log=messages.append)
    assert [d.name for d in docs] == ["good.py"] and "skipped 1 non-UTF-8 document, the first bad.py" in messages[0]
    # A JSONL line that is not UTF-8 is skipped by itself and named by its line.
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_bytes(b'{"text": "one"}\n{"text": "\xff"}\n{"text": "three"}\n')
    docs, _ = read_corpus(DataConfig(source=str(tmp_path / "j")), log=messages.append)
    assert [d.text for d in docs] == ["one", "three"]
    assert f"skipped 1 non-UTF-8 document, the first {tmp_path / 'j' / 'a.jsonl'}:2" in messages[-1]


def test_loaded_tokenizer_is_used_and_gets_an_eos(tmp_path, small_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    write_corpus(tmp_path / "corpus", n_docs=12)
    plain = Tokenizer(models.BPE())  # byte-level alphabet only, no special tokens
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_tokens(pre_tokenizers.ByteLevel.alphabet())
    plain.save(str(tmp_path / "plain.json"))
    dcfg, tcfg = configs(tmp_path, tmp_path / "corpus", path=str(tmp_path / "plain.json"))
    prep = prepare_data(dcfg, tcfg, SEQ_LEN, log=lambda m: None)
    assert prep.vocab_size == 257 and prep.eos_id == 256
    assert tokenizer.load_tokenizer(prep.tokenizer_path).id_to_token(256) == EOS_TOKEN

    small_tokenizer.save(str(tmp_path / "small.json"))
    dcfg, tcfg = configs(tmp_path, tmp_path / "corpus", path=str(tmp_path / "small.json"))
    prep = prepare_data(dcfg, tcfg, SEQ_LEN, log=lambda m: None)
    assert prep.vocab_size == 400 and prep.eos_id == 399  # its own eos kept, nothing appended
    assert Path(prep.tokenizer_path).read_text() == (tmp_path / "small.json").read_text()


# ---------------------------------------------------------------- user errors


def user_error(dcfg: DataConfig, tcfg: TokenizerConfig | None = None, seq_len: int = SEQ_LEN) -> str:
    with pytest.raises(UserError) as info:
        prepare_data(dcfg, tcfg or TokenizerConfig(vocab_size=400), seq_len, log=lambda m: None)
    return str(info.value)


def test_source_errors_name_the_field(tmp_path):
    cache = str(tmp_path / "cache")
    msg = user_error(DataConfig(source=str(tmp_path / "missing"), cache_dir=cache))
    assert msg.startswith("data.source:") and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    assert user_error(DataConfig(source=str(tmp_path / "empty"), cache_dir=cache)) == (
        f"data.source: no .txt/.py/.jsonl/.parquet files under '{tmp_path / 'empty'}'")
    assert "no .txt/.py/.jsonl/.parquet files match" in user_error(
        DataConfig(source=str(tmp_path / "*.nothing"), cache_dir=cache))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    assert user_error(DataConfig(source=str(tmp_path / "blank"), cache_dir=cache)).startswith(
        "data.source: no documents with text found")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("just one document")
    assert "single document" in user_error(DataConfig(source=str(tmp_path / "one"), cache_dir=cache))


def test_text_field_errors_name_the_field(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
    msg = user_error(DataConfig(source=str(tmp_path / "j"), cache_dir=str(tmp_path / "c")))
    assert msg.startswith("data.text_field:") and "a.jsonl:2 has no 'text' field" in msg and "content" in msg
    (tmp_path / "j" / "a.jsonl").write_text('{"text": 5}\n')
    assert "holds int, not text" in user_error(DataConfig(source=str(tmp_path / "j"), cache_dir=str(tmp_path / "c")))
    (tmp_path / "j" / "a.jsonl").write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
    assert user_error(DataConfig(source=str(tmp_path / "j"))) == (
        f"data.source: {tmp_path / 'j' / 'a.jsonl'}:3 is not valid JSON (Invalid control character at)")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p" / "a.parquet")
    msg = user_error(DataConfig(source=str(tmp_path / "p")))
    assert msg.startswith("data.text_field:") and "no column 'text'" in msg and "body" in msg
    (tmp_path / "p" / "a.parquet").write_text("not parquet")
    assert user_error(DataConfig(source=str(tmp_path / "p"))).startswith("data.source: cannot read")


def test_tokenizer_path_errors_name_the_field(tmp_path, small_tokenizer):
    write_corpus(tmp_path / "corpus", n_docs=6)
    dcfg = DataConfig(source=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache"))
    msg = user_error(dcfg, TokenizerConfig(path=str(tmp_path / "nope.json")))
    assert msg.startswith("tokenizer.path:") and "does not exist" in msg
    (tmp_path / "bad.json").write_text("{not json")
    assert user_error(dcfg, TokenizerConfig(path=str(tmp_path / "bad.json"))).startswith(
        "tokenizer.path: cannot read")
    small_tokenizer.save(str(tmp_path / "small.json"))
    msg = user_error(dcfg, TokenizerConfig(path=str(tmp_path / "small.json"), vocab_size=300))
    assert msg.startswith("tokenizer.vocab_size: 300 is smaller") and "at least 400" in msg


def test_too_little_validation_text_names_val_fraction(tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=12)
    dcfg = DataConfig(source=str(tmp_path / "corpus"), val_fraction=0.01, cache_dir=str(tmp_path / "c"))
    tcfg = TokenizerConfig(vocab_size=400)
    n_train = prepare_data(dcfg, tcfg, SEQ_LEN, log=lambda m: None).n_train_tokens
    # One held-out document of twelve cannot fill a block half the train split's length.
    seq_len = n_train // 2
    msg = user_error(dcfg, tcfg, seq_len=seq_len)
    assert msg.startswith("data.val_fraction: the validation split has") and f"= {seq_len + 1};" in msg
    train_msg = user_error(dcfg, tcfg, seq_len=n_train)
    assert train_msg.startswith("data.source: the train split has") and "more data" in train_msg


def test_missing_hf_dataset_names_the_source(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline mode makes the hub lookup fail at once instead of retrying for ~25 s without network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    msg = user_error(DataConfig(source="hf:llmtrain-tests/no-such-dataset"))
    assert msg.startswith("data.source: could not load Hugging Face dataset 'llmtrain-tests/no-such-dataset'")


# ---------------------------------------------------------------- sampler


def run_ranks(samplers: list[ResumableSampler], steps: int) -> list[list[int]]:
    """Per global step, the concatenation of every rank's micro-batch (rank order)."""
    return [sum((s.next_indices() for s in samplers), []) for _ in range(steps)]


def test_sampler_visits_every_block_once_per_epoch():
    n, mb, world = 48, 4, 3  # 4 global steps per epoch exactly
    samplers = [ResumableSampler(n, mb, r, world, seed=7) for r in range(world)]
    epochs = run_ranks(samplers, 8)
    first = sum(epochs[:4], [])
    second = sum(epochs[4:], [])
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second  # a new permutation each epoch
    g = torch.Generator().manual_seed(7)
    assert first == torch.randperm(n, generator=g).tolist()


def test_sampler_drops_the_short_tail_and_wraps():
    samplers = [ResumableSampler(37, 3, r, 2, seed=0) for r in range(2)]
    steps = run_ranks(samplers, 7)  # 6 full global steps of 6 blocks, then a new epoch
    epoch0 = sum(steps[:6], [])
    assert len(set(epoch0)) == 36
    assert steps[6] == torch.randperm(37, generator=torch.Generator().manual_seed(1))[:6].tolist()
    assert samplers[0].state_dict() == {"epoch": 1, "offset": 6, "n_blocks": 37}


def test_sampler_state_round_trip_continues_identically():
    straight = ResumableSampler(50, 4, 1, 2, seed=3)
    reference = [straight.next_indices() for _ in range(20)]  # crosses two epoch boundaries
    first = ResumableSampler(50, 4, 1, 2, seed=3)
    head = [first.next_indices() for _ in range(9)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = ResumableSampler(50, 4, 1, 2, seed=3)
    resumed.load_state_dict(state)
    assert head + [resumed.next_indices() for _ in range(11)] == reference


def test_sampler_resume_on_a_smaller_world_continues_the_global_order():
    two = [ResumableSampler(64, 2, r, 2, seed=5) for r in range(2)]
    reference = run_ranks(two, 12)
    two = [ResumableSampler(64, 2, r, 2, seed=5) for r in range(2)]
    head = run_ranks(two, 5)
    assert head == reference[:5]
    one = ResumableSampler(64, 4, 0, 1, seed=5)  # same global batch on one rank
    one.load_state_dict(two[0].state_dict())
    assert [one.next_indices() for _ in range(7)] == reference[5:]
    half = ResumableSampler(64, 2, 0, 1, seed=5)  # one rank, half the global batch: same order
    half.load_state_dict(two[1].state_dict())
    assert sum((half.next_indices() for _ in range(6)), []) == sum(reference[5:8], [])


def test_sampler_errors():
    with pytest.raises(UserError, match=r"train.micro_batch: 8 × 2 ranks needs 16 blocks .* only 10"):
        ResumableSampler(10, 8, 0, 2, seed=0)
    sampler = ResumableSampler(10, 2, 0, 2, seed=0)
    with pytest.raises(UserError, match="checkpoint's data had 12 training blocks, this data has 10"):
        sampler.load_state_dict({"epoch": 0, "offset": 4, "n_blocks": 12})
