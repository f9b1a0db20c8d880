"""The tokenizer: trained (byte-level BPE) or loaded from tokenizer.path, cached by content hash,
and the UTF-8 bytes each token stands for (bits per byte)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from llmtrain.data.cache import atomic_dir, cache_key, sha256_file
from llmtrain.data.sources import CorpusScan, Log, cap_bytes, iter_documents
from llmtrain.errors import UserError
from llmtrain.recipe import DataConfig, TokenizerConfig

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers, tried in order when loading one.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
# Bump when the reading or training rules change, so caches built by older code are not reused.
TOKENIZER_FORMAT = 1


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer of `vocab_size` tokens, the last being EOS_TOKEN (fewer when the
    text has too few distinct pairs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # room for the eos token appended below
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def tokenizer_texts(scan: CorpusScan, data_cfg: DataConfig, train_bytes: int | None) -> Callable[[], Iterator[str]]:
    """Texts for tokenizer training: the scan's bounded sample (name-hash order, so the cap
    spreads over the whole corpus instead of its alphabetical head), or the whole corpus streamed."""
    if train_bytes:
        return lambda: (doc.text for doc, _ in cap_bytes(scan.sample, train_bytes))
    return lambda: (doc.text for doc in iter_documents(data_cfg))


def _load_user_tokenizer(tok_cfg: TokenizerConfig):
    from tokenizers import Tokenizer

    path = Path(tok_cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"tokenizer.path: {tok_cfg.path!r} does not exist (expected a tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"tokenizer.path: cannot read {tok_cfg.path!r} as a tokenizers "
                        f"tokenizer.json: {e}") from None
    if not any(tok.token_to_id(t) is not None for t in KNOWN_EOS_TOKENS):
        tok.add_special_tokens([EOS_TOKEN])
    if tok.get_vocab_size() > tok_cfg.vocab_size:
        raise UserError(
            f"tokenizer.vocab_size: {tok_cfg.vocab_size} is smaller than the tokenizer at "
            f"tokenizer.path ({tok.get_vocab_size()} tokens with its end-of-document token); "
            f"set tokenizer.vocab_size to at least {tok.get_vocab_size()}"
        )
    return tok


def prepare_tokenizer(tok_cfg: TokenizerConfig, texts: Callable[[], Iterable[str]], corpus_hash: str, cache: Path,
                      log: Log = print) -> Path:
    """tokenizer.json in the cache (trained, or a copy of tokenizer.path with an eos ensured)."""
    import tokenizers

    if tok_cfg.path:
        path = Path(tok_cfg.path).expanduser()
        source = sha256_file(path) if path.is_file() else None
        key = cache_key(TOKENIZER_FORMAT, tokenizers.__version__, "file", source, tok_cfg.vocab_size)
    else:
        key = cache_key(TOKENIZER_FORMAT, tokenizers.__version__, "bpe", corpus_hash, tok_cfg.vocab_size,
                   tok_cfg.min_frequency, tok_cfg.train_bytes)
    final = cache / "tokenizer" / key
    if (final / "tokenizer.json").is_file():
        log(f"data: tokenizer cached at {final}")
        return final / "tokenizer.json"
    t0 = time.perf_counter()
    if tok_cfg.path:
        tok = _load_user_tokenizer(tok_cfg)
    else:
        tok = train_tokenizer(texts(), tok_cfg.vocab_size, tok_cfg.min_frequency)
    eos = next(t for t in KNOWN_EOS_TOKENS if tok.token_to_id(t) is not None)
    with atomic_dir(final) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        meta = {"vocab_size": tok.get_vocab_size(), "eos_token": eos, "eos_id": tok.token_to_id(eos)}
        (tmp / "meta.json").write_text(json.dumps(meta))
    short = "" if tok_cfg.path or tok.get_vocab_size() == tok_cfg.vocab_size else (
        f"; fewer than tokenizer.vocab_size = {tok_cfg.vocab_size:,}: the text has too few pairs seen "
        f"{tok_cfg.min_frequency}+ times, so raise tokenizer.train_bytes or use more data")
    log(f"data: tokenizer {'loaded' if tok_cfg.path else 'trained'} ({tok.get_vocab_size():,} tokens{short}) "
        f"in {time.perf_counter() - t0:.1f}s")
    return final / "tokenizer.json"


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def token_bytes(tokenizer_path: str | Path) -> torch.Tensor:
    """[V] int64: how many UTF-8 bytes of text each token id stands for (special tokens 0), for
    bits per byte = Σ nll / (ln 2 · Σ bytes[target]).

    Exact for byte-level tokenizers (each character of a token is one byte). For other models it
    falls back to the length of the decoded token, with <0xNN> byte-fallback tokens counted as 1.
    """
    from tokenizers import pre_tokenizers

    tok = load_tokenizer(tokenizer_path)
    spec = json.loads(tok.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters that stand for bytes
    out = [0] * tok.get_vocab_size()
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if byte_level and all(c in alphabet for c in token):
            out[i] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(tok.decode([i]).encode("utf-8"))
    for i, added in tok.get_added_tokens_decoder().items():
        out[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return torch.tensor(out, dtype=torch.int64)
