"""Corpus preparation: nanoGPT's split, exact packing, cache reuse/invalidation, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gptlab.data import corpus
from gptlab.data.corpus import clean_text, prepare_corpus
from gptlab.data.tokenizers import Tokenizer, train_tokenizer
from gptlab.errors import UserError

SMALL = ["The quick brown fox jumps over the lazy dog.\n" * 40, "Pack my box with jugs.\n" * 40]


@pytest.fixture(scope="module")
def shakespeare_corpus(shakespeare, tmp_path_factory) -> corpus.PreparedCorpus:
    cache = tmp_path_factory.mktemp("cache")
    return prepare_corpus([shakespeare], name="shakespeare", source_key="k", cache_dir=cache,
                          progress=False)


def prepare_small(cache_dir: Path, **options) -> corpus.PreparedCorpus:
    options = {"name": "small", "source_key": "small-v1", "progress": False, **options}
    return prepare_corpus(SMALL, cache_dir=cache_dir, **options)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_tiny_shakespeare_splits_like_nanogpt(shakespeare_corpus):
    meta = shakespeare_corpus.meta
    assert meta["splits"]["train"] == {"tokens": 1_003_854, "bytes": 1_003_854, "chars": 1_003_854}
    assert meta["splits"]["val"] == {"tokens": 111_540, "bytes": 111_540, "chars": 111_540}
    assert (meta["vocab_size"], meta["dtype"], meta["tokenizer_kind"]) == (65, "uint16", "char")
    assert shakespeare_corpus.splits == ["train", "val"]
    assert shakespeare_corpus.bytes_per_token("val") == 1.0


def test_packed_tokens_decode_to_the_exact_split_text(shakespeare_corpus, shakespeare):
    tok = shakespeare_corpus.tokenizer
    train, val = shakespeare_corpus.tokens("train"), shakespeare_corpus.tokens("val")
    assert train.dtype == np.uint16 and not train.flags.writeable
    assert tok.decode(train.tolist()) == shakespeare[:1_003_854]
    assert tok.decode(val.tolist()) == shakespeare[1_003_854:]
    with pytest.raises(UserError, match="no split 'test'; use one of: train, val"):
        shakespeare_corpus.tokens("test")


def test_bpe_corpus_round_trips_and_learns_from_train_only(tmp_path):
    docs = ["abab abba baab " * 300, "xyzzy " * 50]
    prepared = prepare_corpus(docs, name="b", source_key="b", cache_dir=tmp_path,
                              tokenizer="bpe", vocab_size=300, val_fraction=0.1, progress=False)
    tok, text = prepared.tokenizer, "\n\n".join(docs)
    cut = int(len(text) * 0.9)
    assert tok.decode(prepared.tokens("train").tolist()) == text[:cut]
    assert tok.decode(prepared.tokens("val").tolist()) == text[cut:]
    assert not [t for t in tok.hf.get_vocab() if "z" in t and len(t) > 1]  # no merge from val
    assert prepared.bytes_per_token("train") > 1


def test_train_val_test_are_contiguous_and_cover_the_text(tmp_path):
    prepared = prepare_small(tmp_path, val_fraction=0.2, test_fraction=0.1)
    tok = prepared.tokenizer
    parts = [tok.decode(prepared.tokens(s).tolist()) for s in ("train", "val", "test")]
    text = "\n\n".join(SMALL)
    assert "".join(parts) == text
    train_end, val_end = int(len(text) * 0.7), int(len(text) * 0.9)
    assert [len(p) for p in parts] == [train_end, val_end - train_end, len(text) - val_end]


def test_second_call_reuses_the_cache_without_reading_documents(tmp_path):
    first = prepare_small(tmp_path)
    before = snapshot(first.root)

    def must_not_be_read():
        raise AssertionError("documents were read on a cache hit")

    second = prepare_corpus(must_not_be_read, name="small", source_key="small-v1",
                            cache_dir=tmp_path, progress=False)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.root == first.root
    assert snapshot(second.root) == before


@pytest.mark.parametrize(
    "change",
    [
        {"source_key": "small-v2"},
        {"val_fraction": 0.2},
        {"test_fraction": 0.1},
        {"cleaning": {"normalize_whitespace": True}},
        {"vocab_size": 320},
        {"tokenizer": "char"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_changing_an_option_uses_another_folder(tmp_path, change):
    base = {"tokenizer": "bpe", "vocab_size": 300}
    first = prepare_small(tmp_path, **base)
    second = prepare_small(tmp_path, **{**base, **change})
    assert not second.from_cache
    assert second.root != first.root
    assert second.root.name.startswith("small-")


def test_equivalent_options_share_a_folder(tmp_path):
    first = prepare_small(tmp_path, cleaning={})
    second = prepare_small(tmp_path, cleaning={"strip_ansi": False}, vocab_size=999)
    assert second.from_cache and second.root == first.root  # char ignores vocab_size


def test_crash_mid_prepare_leaves_no_cache_and_spares_others(tmp_path, monkeypatch):
    existing = prepare_small(tmp_path)
    before = snapshot(existing.root)

    def crash(self, text):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Tokenizer, "encode", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_small(tmp_path, val_fraction=0.3)
    assert list(tmp_path.iterdir()) == [existing.root]
    assert snapshot(existing.root) == before


def test_losing_a_race_uses_the_winners_folder(tmp_path, monkeypatch):
    name = prepare_small(tmp_path / "elsewhere").root.name  # the key does not depend on cache_dir
    cache = tmp_path / "cache"
    real_write = corpus._write_corpus

    def write_while_another_run_wins(folder, *args):
        real_write(folder, *args)
        winner = tmp_path / "winner"
        winner.mkdir()
        real_write(winner, *args)
        (winner / "winner.txt").touch()
        os.rename(winner, cache / name)

    monkeypatch.setattr(corpus, "_write_corpus", write_while_another_run_wins)
    prepared = prepare_small(cache)
    assert prepared.root == cache / name and prepared.from_cache
    assert (prepared.root / "winner.txt").exists()
    assert list(cache.iterdir()) == [prepared.root]


def test_given_tokenizer_is_used_as_is(tmp_path):
    tok = train_tokenizer("char", ["".join(SMALL) + "!"])
    prepared = prepare_small(tmp_path, tokenizer=tok)
    assert prepared.tokenizer.to_str() == tok.to_str()
    assert prepared.meta["options"]["tokenizer"] == "given"
    with pytest.raises(UserError, match="'@'"):
        prepare_corpus(["an @ sign"], name="x", source_key="x", cache_dir=tmp_path,
                       tokenizer=tok, progress=False)
    assert list(tmp_path.iterdir()) == [prepared.root]


def test_empty_corpus_and_empty_split_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="corpus noise is empty after cleaning"):
        prepare_corpus(["\x1b[31m\x1b[0m"], name="noise", source_key="n", cache_dir=tmp_path,
                       cleaning={"strip_ansi": True}, progress=False)
    with pytest.raises(UserError, match="split 'val'.*val_fraction=0.01, test_fraction=0.15"):
        prepare_corpus(["abcdefghij"], name="tiny", source_key="t", cache_dir=tmp_path,
                       val_fraction=0.01, test_fraction=0.15, progress=False)
    with pytest.raises(UserError, match="unknown cleaning option"):
        prepare_small(tmp_path, cleaning={"lowercase": True})
    with pytest.raises(UserError, match="sum to less than 1"):
        prepare_small(tmp_path, val_fraction=0.5, test_fraction=0.5)
    assert list(tmp_path.iterdir()) == []


def test_clean_text_options():
    noisy = "\x1b[1;31mred\x1b[0m \x1b]0;title\x07ok\x1b]8;;http://x\x1b\\link"
    assert clean_text(noisy, strip_ansi=True) == "red oklink"
    assert clean_text("a\x00b\x07c\td\ne\x85f\x7f", strip_control=True) == "abc\td\nef"
    messy = "a  \t b   \r\nc\rd \n \n\n\n\ne\t"
    assert clean_text(messy, normalize_whitespace=True) == "a b\nc\nd\n\ne"
    assert clean_text("x\r\ny\rz", normalize_whitespace=True, strip_control=True) == "x\ny\nz"
    assert clean_text(noisy + messy) == noisy + messy
