"""Tokenizers: exact round trips, nanoGPT's char vocabulary, clear errors, save/load."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer

from gptlab.data import sources
from gptlab.data.documents import TextFiles
from gptlab.data.lm_datamodule import LMDataModule
from gptlab.data.tokenizers import (
    EOS_TOKEN,
    Tokenizer,
    _byte_chars,
    from_spec,
    from_tiktoken_ranks,
    train_tokenizer,
)
from gptlab.errors import UserError

# GPT-2's pre-tokenizer regex as tiktoken writes it (tiktoken_ext/openai_public.py).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
                r"""|\s+(?!\S)|\s""")

SAMPLES = [
    "Hello, world! 123",
    "café über niño déjà vu",
    "你好，世界",
    "emoji 🙂👍🏽 and flags 🇫🇷",
    "a\n\nb  c\t\td \r\n e   \n\n\n  \t",
]


@pytest.fixture(scope="module")
def bpe(shakespeare) -> Tokenizer:
    """Trained on ASCII only, so every non-ASCII sample is new to it."""
    return train_tokenizer("bpe", shakespeare[:200_000].splitlines(keepends=True), vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trips_text_it_never_saw(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_char_round_trips_one_token_per_character(text):
    tok = train_tokenizer("char", SAMPLES)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_char_vocabulary_of_tiny_shakespeare_is_nanogpts(shakespeare):
    tok = train_tokenizer("char", [shakespeare])
    chars = sorted(set(shakespeare))
    assert tok.vocab_size == len(chars) == 65
    assert tok.encode("".join(chars)) == list(range(65))
    assert tok.encode("First Citizen") == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52]
    assert tok.eos_id is None


def test_char_refuses_unknown_characters():
    tok = train_tokenizer("char", ["abc"])
    with pytest.raises(UserError, match=r"'é' \(U\+00E9\).*bpe") as info:
        tok.encode("abé")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="'z'"):
        tok.encode_batch(["ab", "cz"])


def test_bpe_respects_vocab_size_and_has_eos(bpe):
    assert bpe.vocab_size == 400
    assert bpe.eos_id is not None
    assert bpe.encode(f"a{EOS_TOKEN}b")[1] == bpe.eos_id
    assert bpe.decode(bpe.encode(f"a{EOS_TOKEN}b")) == f"a{EOS_TOKEN}b"


def test_char_special_tokens_come_after_the_characters():
    tok = train_tokenizer("char", ["ba"], special_tokens=[EOS_TOKEN])
    assert tok.encode("ab") == [0, 1]
    assert tok.eos_id == 2
    assert tok.encode(f"a{EOS_TOKEN}") == [0, 2]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_keep_kind_vocab_and_ids(tmp_path, shakespeare, kind):
    text = shakespeare[:20_000]
    tok = train_tokenizer(kind, [text], vocab_size=300 if kind == "bpe" else None)
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == (kind, tok.vocab_size, tok.eos_id)
    assert loaded.encode(text) == tok.encode(text)
    assert Tokenizer.from_str(tok.to_str()).encode(text) == tok.encode(text)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_long_text_encodes_as_in_one_pass(shakespeare, kind):
    # Long inputs are encoded in parallel pieces; the ids must not depend on the cuts.
    text = shakespeare[:300_000].replace(":\n", ":\n\n \t").replace(".\n", ".\r\n")
    tok = train_tokenizer(kind, [text], vocab_size=500 if kind == "bpe" else None)
    assert tok.encode(text) == HFTokenizer.from_str(tok.to_str()).encode(text).ids


def test_unknown_kind_and_too_small_bpe_vocab_are_user_errors():
    with pytest.raises(UserError, match="'wordpiece'.*char, bpe"):
        train_tokenizer("wordpiece", ["abc"])
    with pytest.raises(UserError, match="vocab_size >= 258"):
        train_tokenizer("bpe", ["abc"], vocab_size=100)
    with pytest.raises(UserError, match="empty"):
        train_tokenizer("char", [""])


def test_loading_a_missing_or_corrupt_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad\.json is not a valid tokenizer\.json"):
        Tokenizer.load(tmp_path / "bad.json")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode_array_gives_the_ids_of_each_text_concatenated(shakespeare, kind):
    texts = [shakespeare[:70_000], "", shakespeare[70_000:90_000].replace("\n", "\r\n")]
    tok = train_tokenizer(kind, texts, vocab_size=500 if kind == "bpe" else None)
    ids = tok.encode_array(texts)
    assert ids.dtype == np.uint32
    assert ids.tolist() == [i for text in texts for i in tok.encode(text)]
    with_specials = train_tokenizer("char", texts, special_tokens=[EOS_TOKEN])  # general path
    assert with_specials.encode_array(["ab" + EOS_TOKEN]).tolist() == with_specials.encode(
        "ab" + EOS_TOKEN)
    if kind == "char":
        with pytest.raises(UserError, match=r"'é' \(U\+00E9\)"):
            tok.encode_array(["abé"])


def ranks_file(path: Path, text: str, vocab_size: int = 400) -> dict[bytes, int]:
    """A small tokenizer in GPT-2's format (tiktoken merge ranks), from a BPE trained here."""
    trained = train_tokenizer("bpe", [text], vocab_size=vocab_size)
    to_byte = {char: b for b, char in enumerate(_byte_chars())}
    vocab = trained.hf.get_vocab(with_added_tokens=False)
    tokens = [t for t in sorted(vocab, key=vocab.get) if not t.startswith("<|")]
    ranks = {bytes(to_byte[c] for c in token): rank for rank, token in enumerate(tokens)}
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
         "  café über 你好 🙂 \r\n\t x   \n\n\n y's we'll 12345 3.14 ", "z" * 40]


def test_a_tiktoken_ranks_file_becomes_a_tokenizer_that_encodes_like_tiktoken(
        tmp_path, shakespeare):
    ranks = ranks_file(tmp_path / "small.tiktoken", shakespeare[:100_000])
    tok = from_tiktoken_ranks(tmp_path / "small.tiktoken")
    reference = tiktoken.Encoding("small", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={EOS_TOKEN: len(ranks)})
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("bpe", len(ranks) + 1, len(ranks))
    for text in [*TEXTS, shakespeare[100_000:160_000]]:
        assert tok.encode(text) == reference.encode(text), text[:40]
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(f"a{EOS_TOKEN}b")[1] == tok.eos_id
    (tmp_path / "bad.tiktoken").write_text("not base64!\n")
    with pytest.raises(UserError, match=r"bad\.tiktoken line 1 is not"):
        from_tiktoken_ranks(tmp_path / "bad.tiktoken")
    (tmp_path / "gap.tiktoken").write_text("YQ== 0\n")
    with pytest.raises(UserError, match="all 256 single bytes"):
        from_tiktoken_ranks(tmp_path / "gap.tiktoken")


def test_gpt2_is_found_like_any_registered_file(tmp_path, shakespeare, monkeypatch):
    """data.tokenizer=gpt2 offline: a mirror holding the ranks file (here a small stand-in)."""
    relpath = sources.GPT2_RANKS.relpath
    (tmp_path / relpath).parent.mkdir(parents=True)
    ranks_file(tmp_path / relpath, shakespeare[:50_000], vocab_size=300)
    stand_in = sources.RemoteFile(relpath, sources.GPT2_RANKS.url,
                                  sources.sha256_of(tmp_path / relpath))
    monkeypatch.setattr(sources, "GPT2_RANKS", stand_in)
    monkeypatch.setenv(sources.MIRROR_ENV, str(tmp_path))
    tok = from_spec("gpt2")
    assert tok.vocab_size == 299 and tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]
    tok.save(tmp_path / "tokenizer.json")
    assert from_spec(str(tmp_path / "tokenizer.json")).to_str() == tok.to_str()
    # data.tokenizer=gpt2 of an LM corpus
    (tmp_path / "corpus.txt").write_text(shakespeare[:20_000])
    data = LMDataModule("g", TextFiles([str(tmp_path / "corpus.txt")]), block_size=16,
                        batch_size=2, tokenizer="gpt2", cache_dir=str(tmp_path / "cache"))
    assert data.tokenizer.to_str() == tok.to_str() and data.vocab_size == 299


def real_gpt2_ranks() -> Path | None:
    """GPT-2's own ranks, if this machine has them (mirror or openai-whisper), else None."""
    mirrored = Path(os.environ.get(sources.MIRROR_ENV, "")) / sources.GPT2_RANKS.relpath
    if mirrored.is_file():
        return mirrored
    return sources._package_copy(sources.GPT2_RANKS)


@pytest.mark.skipif(real_gpt2_ranks() is None, reason="GPT-2's ranks are not on this machine "
                    "(put gpt2/r50k_base.tiktoken in the data mirror, or install openai-whisper)")
def test_gpt2_gives_gpt2s_own_ids(shakespeare):
    tok = from_spec("gpt2")
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    reference = tiktoken.Encoding(
        "gpt2", pat_str=GPT2_PATTERN, special_tokens={EOS_TOKEN: 50256},
        mergeable_ranks=load_tiktoken_bpe(str(real_gpt2_ranks())))
    for text in [*TEXTS, shakespeare]:
        assert tok.encode(text) == reference.encode(text)
