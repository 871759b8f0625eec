"""Tokenizers: exact round trips, nanoGPT's char vocabulary, clear errors, save/load."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from gptlab.data.tokenizers import EOS_TOKEN, Tokenizer, train_tokenizer
from gptlab.errors import UserError

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
