"""The data cache serves a prepared corpus only to a recipe that would prepare the same one: each
recipe key that changes the tokenizer or the packed data, changed alone, gives exactly what a
preparation into an empty cache gives (a stale entry would serve the old split or vocabulary)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from llmtrain.data.prepare import prepare_data
from llmtrain.data.tokenizer import train_tokenizer
from llmtrain.recipe import DataConfig, TokenizerConfig
from test_data import stdlib_texts, write_corpus

SEQ_LEN = 31
BASE_DATA = {"val_fraction": 0.2, "num_proc": 1, "shard_tokens": 4096}
BASE_TOKENIZER = {"vocab_size": 320, "min_frequency": 2}


def prepared_contents(prep) -> dict:
    """Everything a prepared corpus holds, apart from where in the cache it lies: the tokenizer's
    bytes and every shard file's bytes, per split."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    splits = {split: [(p.name, digest(p)) for p in sorted(Path(folder).iterdir())]
              for split, folder in (("train", prep.train_path), ("val", prep.val_path))}
    return {"tokenizer": digest(Path(prep.tokenizer_path)), "vocab_size": prep.vocab_size, "eos_id": prep.eos_id,
            "counts": digest(Path(prep.counts_path)), **splits}


def prepare(corpus: Path, cache: Path, data: dict, tokenizer: dict):
    dcfg = DataConfig(**{"source": str(corpus), "cache_dir": str(cache), **BASE_DATA, **data})
    return prepare_data(dcfg, TokenizerConfig(**{**BASE_TOKENIZER, **tokenizer}), SEQ_LEN, log=lambda m: None)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A folder of text files, the same documents as JSONL with two text fields, a tokenizer file,
    and a cache holding the base recipe's preparation of each."""
    root = tmp_path_factory.mktemp("keys")
    texts = write_corpus(root / "txt", n_docs=12)
    with (root / "docs.jsonl").open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "body": text[::-1]}) + "\n")
    train_tokenizer(stdlib_texts(10), vocab_size=300).save(str(root / "tokenizer.json"))
    for corpus in ("txt", "docs.jsonl"):
        prepare(root / corpus, root / "cache", {}, {})
        prepare(root / corpus, root / "cache", {}, {"path": str(root / "tokenizer.json")})
    return root


# (corpus, the key changed alone, its base value → the changed one); a loaded tokenizer (the same
# file whatever the corpus) makes the corpus keys reach the token shards' key directly.
LOADED = "loaded tokenizer"
CHANGES = [
    ("txt", "tokenizer.vocab_size", 320, 290),
    ("txt", "tokenizer.min_frequency", 2, 60),
    ("txt", "tokenizer.train_bytes", None, 8000),
    ("txt", "data.val_fraction", 0.2, 0.4),
    ("txt", "data.shard_tokens", 4096, 2048),
    ("txt", "data.max_bytes", None, 20000),
    ("docs.jsonl", "data.text_field", "text", "body"),
    ("txt", "data.max_bytes", None, 20000, LOADED),
    ("docs.jsonl", "data.text_field", "text", "body", LOADED),
]


CASES = [case + ("",) * (5 - len(case)) for case in CHANGES]


@pytest.mark.parametrize("corpus, key, base, changed, tokenizer", CASES, ids=[f"{c[1]} {c[4]}".strip() for c in CASES])
def test_each_key_that_changes_the_data_invalidates_the_cache(corpora, tmp_path, corpus, key, base, changed, tokenizer):
    section, field = key.split(".")
    loaded = {"path": str(corpora / "tokenizer.json")} if tokenizer else {}
    change = {"data": {}, "tokenizer": loaded, section: {field: changed}}
    change["tokenizer"] = {**loaded, **change["tokenizer"]}
    cache = tmp_path / "cache"
    shutil.copytree(corpora / "cache", cache)
    served = prepare(corpora / corpus, cache, change["data"], change["tokenizer"])
    fresh = prepare(corpora / corpus, tmp_path / "empty", change["data"], change["tokenizer"])
    before = prepare(corpora / corpus, cache, {}, loaded)
    assert prepared_contents(fresh) != prepared_contents(before), f"{key}={changed} changes nothing here: a useless case"
    assert prepared_contents(served) == prepared_contents(fresh), f"the cache served {key}={base}'s data for {changed}"


def test_a_tokenizer_file_rewritten_in_place_invalidates_the_cache(corpora, tmp_path):
    """tokenizer.path names the same file; its content changed."""
    cache = tmp_path / "cache"
    shutil.copytree(corpora / "cache", cache)
    path = tmp_path / "tokenizer.json"
    shutil.copy(corpora / "tokenizer.json", path)
    before = prepare(corpora / "txt", cache, {}, {"path": str(path)})
    train_tokenizer(stdlib_texts(10, skip=50), vocab_size=280).save(str(path))
    served = prepare(corpora / "txt", cache, {}, {"path": str(path)})
    fresh = prepare(corpora / "txt", tmp_path / "empty", {}, {"path": str(path)})
    assert prepared_contents(fresh) != prepared_contents(before)
    assert prepared_contents(served) == prepared_contents(fresh)
