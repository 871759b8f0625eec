"""Corpus preparation: today's Shakespeare tokens, the three splits, shards, parallel workers,
resume, cache keys, user errors."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from gptlab.data import corpus
from gptlab.data.corpus import TokenShards, cache_key, clean_text, prepare_corpus
from gptlab.data.documents import Combined, HFDataset, KnownFile, TableColumn, TextFiles
from gptlab.data.tokenizers import Tokenizer, train_tokenizer
from gptlab.errors import UserError

SMALL = ["The quick brown fox jumps over the lazy dog.\n" * 40, "Pack my box with jugs.\n" * 40]

# sha256 of the token files, tokenizer.json and counts that main made before the data-scale
# rework (data=shakespeare_char and data=shakespeare_bpe): published losses stay comparable.
PINNED = {
    "char": {"train": "6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f",
             "val": "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1",
             "tokenizer": "330a58c2b60ebef8cb04af5d8cda166cedc7ee8fb586d383c5525f19c9d3dcec",
             "tokens": (1_003_854, 111_540)},
    "bpe": {"train": "d832a654c60b47c6f5d57dfce91e7ab4d86f7273722194f06c46ecbcca0d6a1f",
            "val": "9965b7e1d6d3ad76d95032285de67f8c90914213dbec838d74813be0ecffbaad",
            "tokenizer": "39a57c8079b5bfd8c9fd128bf7863c4fb8a6fe02136e471074a199d6acf9684b",
            "tokens": (346_897, 43_564)},
}


@pytest.fixture(scope="module")
def shakespeare_corpus(shakespeare, tmp_path_factory) -> corpus.PreparedCorpus:
    cache = tmp_path_factory.mktemp("cache")
    return prepare_corpus(KnownFile("tinyshakespeare/input.txt"), name="shakespeare",
                          cache_dir=cache, progress=False)


def write_files(folder: Path, texts: list[str], prefix: str = "doc") -> TextFiles:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        path = folder / f"{prefix}{i:03d}.txt"
        if not path.is_file() or path.read_bytes() != text.encode():  # unchanged: same mtime
            path.write_text(text)
    return TextFiles([str(folder / f"{prefix}*.txt")])


def prepare_small(tmp_path: Path, **options) -> corpus.PreparedCorpus:
    source = write_files(tmp_path / "small", SMALL)
    options = {"name": "small", "cache_dir": tmp_path / "cache", "progress": False,
               "split_by": "contiguous", **options}
    return prepare_corpus(source, **options)


def many_documents(n: int = 60) -> list[str]:
    return ["\n".join([f"Document {i} says {'abc ' * (i % 7 + 1)}and ends."] * 20)
            for i in range(n)]


def all_tokens(prepared: corpus.PreparedCorpus) -> dict[str, bytes]:
    return {split: np.asarray(prepared.tokens(split)).tobytes() for split in prepared.splits}


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tiny_shakespeare_tokens_are_those_of_main(shakespeare, tmp_path, kind):
    prepared = prepare_corpus(KnownFile("tinyshakespeare/input.txt"), name="s",
                              cache_dir=tmp_path, tokenizer=kind,
                              vocab_size=2048 if kind == "bpe" else None, progress=False)
    pinned = PINNED[kind]
    assert prepared.meta["options"]["mode"] == "contiguous"
    assert [len(prepared.tokens(s)) for s in ("train", "val")] == list(pinned["tokens"])
    assert sha(np.asarray(prepared.tokens("train")).tobytes()) == pinned["train"]
    assert sha(np.asarray(prepared.tokens("val")).tobytes()) == pinned["val"]
    assert sha((prepared.root / "tokenizer.json").read_bytes()) == pinned["tokenizer"]


def test_tiny_shakespeare_splits_like_nanogpt(shakespeare_corpus):
    meta = shakespeare_corpus.meta
    for split, n in (("train", 1_003_854), ("val", 111_540)):
        assert {k: meta["splits"][split][k] for k in ("tokens", "bytes", "chars")} == {
            "tokens": n, "bytes": n, "chars": n}
    assert (meta["vocab_size"], meta["dtype"], meta["tokenizer_kind"]) == (65, "uint16", "char")
    assert shakespeare_corpus.splits == ["train", "val"]
    assert shakespeare_corpus.bytes_per_token("val") == 1.0


def test_packed_tokens_decode_to_the_exact_split_text(shakespeare_corpus, shakespeare):
    tok = shakespeare_corpus.tokenizer
    train, val = shakespeare_corpus.tokens("train"), shakespeare_corpus.tokens("val")
    assert train.dtype == np.uint16 and not train[:10].flags.writeable
    assert tok.decode(np.asarray(train).tolist()) == shakespeare[:1_003_854]
    assert tok.decode(np.asarray(val).tolist()) == shakespeare[1_003_854:]
    with pytest.raises(UserError, match="no split 'test'; use one of: train, val"):
        shakespeare_corpus.tokens("test")


def test_bpe_corpus_round_trips_and_learns_from_train_only(tmp_path):
    text = "abab abba baab " * 300 + "\n\n" + "xyzzy " * 50
    source = write_files(tmp_path / "b", [text])
    prepared = prepare_corpus(source, name="b", cache_dir=tmp_path / "cache", tokenizer="bpe",
                              vocab_size=300, val_fraction=0.1, progress=False)
    tok, cut = prepared.tokenizer, int(len(text) * 0.9)
    assert tok.decode(np.asarray(prepared.tokens("train")).tolist()) == text[:cut]
    assert tok.decode(np.asarray(prepared.tokens("val")).tolist()) == text[cut:]
    assert not [t for t in tok.hf.get_vocab() if "z" in t and len(t) > 1]  # no merge from val
    assert prepared.meta["tokenizer_training"] == {"sample_chars": cut, "train_chars": cut,
                                                   "whole_train_split": True}


def test_contiguous_split_joins_documents_and_cuts_them_in_order(tmp_path):
    prepared = prepare_small(tmp_path, val_fraction=0.2, test_fraction=0.1)
    tok = prepared.tokenizer
    parts = [tok.decode(np.asarray(prepared.tokens(s)).tolist()) for s in ("train", "val", "test")]
    text = "\n\n".join(SMALL)
    assert "".join(parts) == text
    train_end, val_end = int(len(text) * 0.7), int(len(text) * 0.9)
    assert [len(p) for p in parts] == [train_end, val_end - train_end, len(text) - val_end]


def test_split_by_document_keeps_each_document_whole_whatever_the_order(tmp_path):
    docs = many_documents()
    forward = prepare_corpus(write_files(tmp_path / "a", docs), name="d", progress=False,
                             cache_dir=tmp_path / "cache", val_fraction=0.2, test_fraction=0.1)
    # The same documents under other names, so in another order: the same documents per split.
    backward = prepare_corpus(write_files(tmp_path / "b", docs[::-1], prefix="z"), name="d",
                              progress=False, cache_dir=tmp_path / "cache", val_fraction=0.2,
                              test_fraction=0.1)
    assert forward.meta["options"]["mode"] == "document"
    split_docs = {}
    for prepared in (forward, backward):
        tok = prepared.tokenizer
        texts = {s: tok.decode(np.asarray(prepared.tokens(s)).tolist()) for s in
                 prepared.splits}
        # Every document, followed by the separator, is in exactly one split.
        found = {s: sorted(t for t in text.split("\n\n") if t) for s, text in texts.items()}
        assert sorted(sum(found.values(), [])) == sorted(docs)
        split_docs[prepared.root] = found
    assert split_docs[forward.root] == split_docs[backward.root]
    counts = {s: forward.meta["splits"][s]["documents"] for s in ("train", "val", "test")}
    assert sum(counts.values()) == 60 and counts["val"] >= 4 and counts["test"] >= 1


def test_shards_of_many_units_and_parallel_workers_give_the_same_tokens(tmp_path, monkeypatch):
    source = write_files(tmp_path / "docs", many_documents())
    one = prepare_corpus(source, name="one", cache_dir=tmp_path / "c1", tokenizer="bpe",
                         vocab_size=300, progress=False, num_proc=1)
    monkeypatch.setattr(corpus, "UNIT_BYTES", 4096)  # about 6 documents a unit
    for num_proc in (1, 2):
        sharded = prepare_corpus(source, name="many", cache_dir=tmp_path / f"c{num_proc}x",
                                 tokenizer="bpe", vocab_size=300, progress=False,
                                 num_proc=num_proc)
        assert len(sharded.meta["splits"]["train"]["shards"]) > 5
        assert all_tokens(sharded) == all_tokens(one)
        assert sharded.tokenizer.to_str() == one.tokenizer.to_str()


def test_a_large_file_is_read_in_parts_that_tokenize_as_the_whole(tmp_path, monkeypatch,
                                                                  shakespeare):
    text = shakespeare[:200_000]
    whole = prepare_corpus(write_files(tmp_path / "f", [text]), name="w", progress=False,
                           cache_dir=tmp_path / "c1", tokenizer="bpe", vocab_size=400)
    monkeypatch.setattr("gptlab.data.documents.PART_BYTES", 30_000)
    monkeypatch.setattr(corpus, "UNIT_BYTES", 30_000)
    parts = prepare_corpus(write_files(tmp_path / "f", [text]), name="p", progress=False,
                           cache_dir=tmp_path / "c2", tokenizer="bpe", vocab_size=400)
    assert len(parts.meta["splits"]["train"]["shards"]) >= 6
    assert all_tokens(parts) == all_tokens(whole)


def test_hugging_face_dataset_uses_its_own_splits(tmp_path):
    files = {}
    for split, n in (("train", 40), ("validation", 5), ("test", 6)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": f" {split} row {i}\n"}) + "\n"
                                        for i in range(n)))
    source = HFDataset("json", data_files={k: str(v) for k, v in files.items()},
                       split_names={"train": "train", "val": "validation", "test": "test"},
                       cache_dir=str(tmp_path / "hf"))
    prepared = prepare_corpus(source, name="hf", cache_dir=tmp_path / "cache",
                              document_separator="", progress=False, val_fraction=0.5)
    tok = prepared.tokenizer
    assert prepared.meta["options"]["mode"] == "dataset"
    assert tok.decode(np.asarray(prepared.tokens("val")).tolist()) == "".join(
        f" validation row {i}\n" for i in range(5))
    assert [prepared.meta["splits"][s]["documents"] for s in ("train", "val", "test")] == [
        40, 5, 6]
    streamed = HFDataset("json", data_files={k: str(v) for k, v in files.items()},
                         split_names={"train": "train", "val": "validation", "test": "test"},
                         cache_dir=str(tmp_path / "hf"), streaming=True)
    again = prepare_corpus(streamed, name="hf", cache_dir=tmp_path / "cache",
                           document_separator="", progress=False)
    assert again.from_cache and again.root == prepared.root  # read either way, the same data
    with pytest.raises(UserError, match="split_by=document conflicts with"):
        prepare_corpus(source, name="hf", cache_dir=tmp_path / "cache", split_by="document")


def test_second_call_reuses_the_cache_without_reading_documents(tmp_path, monkeypatch):
    first = prepare_small(tmp_path)
    before = snapshot(first.root)

    def must_not_be_read(self):
        raise AssertionError("documents were read on a cache hit")

    monkeypatch.setattr("gptlab.data.documents.FilePart.read", must_not_be_read)
    second = prepare_small(tmp_path)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.root == first.root
    assert snapshot(second.root) == before


def test_a_changed_file_is_detected_and_the_cache_rebuilt(tmp_path):
    first = prepare_small(tmp_path)
    (tmp_path / "small" / "doc001.txt").write_text("Pack my box with five dozen jugs.\n" * 40)
    second = prepare_corpus(TextFiles([str(tmp_path / "small" / "*.txt")]), name="small",
                            cache_dir=tmp_path / "cache", split_by="contiguous", progress=False)
    assert not second.from_cache and second.root != first.root
    assert "dozen" in second.tokenizer.decode(np.asarray(second.tokens("train")).tolist())


@pytest.mark.parametrize(
    "change",
    [
        {"val_fraction": 0.2},
        {"test_fraction": 0.1},
        {"cleaning": {"normalize_whitespace": True}},
        {"vocab_size": 320},
        {"tokenizer": "char"},
        {"document_separator": "\n"},
        {"tokenizer_sample_chars": 100},
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
    # char ignores vocab_size and the bpe sample size; num_proc changes no token.
    second = prepare_small(tmp_path, cleaning={"strip_ansi": False}, vocab_size=999,
                           tokenizer_sample_chars=5, num_proc=2)
    assert second.from_cache and second.root == first.root
    source = write_files(tmp_path / "small", SMALL)
    assert second.root.name == f"small-{cache_key(source, split_by='contiguous')[:12]}"


@pytest.mark.parametrize("num_proc", [1, 2])
def test_an_interrupted_preparation_resumes_with_the_units_it_finished(tmp_path, monkeypatch,
                                                                        num_proc):
    source = write_files(tmp_path / "docs", many_documents())
    monkeypatch.setattr(corpus, "UNIT_BYTES", 4096)
    options = {"name": "r", "cache_dir": tmp_path / "cache", "tokenizer": "bpe",
               "vocab_size": 300, "progress": False, "num_proc": num_proc}
    real = corpus._encode_unit

    def crash_at_unit_4(job):
        if job.unit.index == 4:
            raise RuntimeError("simulated crash")  # a killed worker, a full disk, ...
        return real(job)

    monkeypatch.setattr(corpus, "_encode_unit", crash_at_unit_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_corpus(source, **options)
    (partial,) = (tmp_path / "cache").glob(".partial-*")
    assert not list((tmp_path / "cache").glob("r-*"))  # nothing half-done is ever opened
    # Units 0-3 are recorded; 4 is not (other workers' units may be, or be half-written).
    records = {p.name for p in (partial / "units").iterdir()}
    assert {f"00000{i}.json" for i in range(4)} <= records and "000004.json" not in records
    finished = {p.name: p.stat().st_ino for p in (partial / "shards").glob("train-00000[0-3].bin")}

    monkeypatch.setattr(corpus, "_encode_unit", real)
    resumed = prepare_corpus(source, **options)
    assert not partial.exists()
    # The finished units' shards are the very files of the first attempt, not new ones.
    assert {name: (resumed.root / "shards" / name).stat().st_ino for name in finished} == finished
    fresh = prepare_corpus(source, **{**options, "cache_dir": tmp_path / "fresh"})
    assert all_tokens(resumed) == all_tokens(fresh)


def test_a_user_error_leaves_no_cache_and_spares_others(tmp_path):
    existing = prepare_small(tmp_path)
    before = snapshot(existing.root)
    (tmp_path / "small" / "doc001.txt").write_bytes(b"ok \xff bad")
    with pytest.raises(UserError, match=r"doc001\.txt is not valid UTF-8 at byte 3"):
        prepare_corpus(TextFiles([str(tmp_path / "small" / "*.txt")]), name="small",
                       cache_dir=tmp_path / "cache", progress=False)
    cache = tmp_path / "cache"
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == [existing.root]
    assert snapshot(existing.root) == before


def test_concurrent_preparations_of_one_corpus_wait_and_share_it(tmp_path):
    source = write_files(tmp_path / "docs", many_documents(20))
    results, errors = [], []

    def prepare():
        try:
            results.append(prepare_corpus(source, name="c", cache_dir=tmp_path / "cache",
                                          num_proc=1, progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({r.root for r in results}) == 1
    assert sorted(r.from_cache for r in results) == [False, True, True]


def test_bpe_trains_on_a_bounded_sample_and_says_so(tmp_path):
    source = write_files(tmp_path / "docs", many_documents())
    prepared = prepare_corpus(source, name="s", cache_dir=tmp_path / "cache", tokenizer="bpe",
                              vocab_size=300, tokenizer_sample_chars=5000, progress=False)
    training = prepared.meta["tokenizer_training"]
    assert training["sample_chars"] == 5000 and not training["whole_train_split"]
    assert training["train_chars"] == prepared.meta["splits"]["train"]["chars"] > 5000


def test_given_tokenizer_is_used_as_is(tmp_path):
    tok = train_tokenizer("char", ["".join(SMALL) + "!"])
    prepared = prepare_small(tmp_path, tokenizer=tok)
    assert prepared.tokenizer.to_str() == tok.to_str()
    assert prepared.meta["options"]["tokenizer"] == "given"
    other = write_files(tmp_path / "other", ["an @ sign"])
    with pytest.raises(UserError, match="'@'"):
        prepare_corpus(other, name="x", cache_dir=tmp_path / "cache", tokenizer=tok,
                       progress=False)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        prepared.root]


def test_a_tokenizer_json_path_is_a_tokenizer(tmp_path):
    tok = train_tokenizer("bpe", SMALL, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    prepared = prepare_small(tmp_path, tokenizer=str(tmp_path / "tokenizer.json"))
    assert prepared.tokenizer.to_str() == tok.to_str()
    with pytest.raises(UserError, match="neither one of char, bpe, gpt2 nor an existing"):
        prepare_small(tmp_path, tokenizer=str(tmp_path / "missing.json"))


def test_combined_sources_and_a_table_column(tmp_path):
    table = tmp_path / "t.tsv"
    table.write_text("sentence\tlabel\n" + "".join(f"row {i} is fine\t1\n" for i in range(30)))
    source = Combined([write_files(tmp_path / "notes", ["some notes\n" * 20]),
                       TableColumn([str(table)], "sentence")])
    prepared = prepare_corpus(source, name="c", cache_dir=tmp_path / "cache", progress=False,
                              val_fraction=0.2)
    assert prepared.meta["documents"] == 31
    with pytest.raises(UserError, match="own splits"):
        Combined([HFDataset("json", split_names={"train": "a", "val": "b"})])


def test_empty_corpus_and_empty_splits_are_user_errors(tmp_path):
    def prepare(texts: list[str], **options) -> None:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        prepare_corpus(write_files(folder, texts), name="x", cache_dir=tmp_path / "cache",
                       progress=False, **options)

    with pytest.raises(UserError, match="corpus x is empty after cleaning"):
        prepare(["\x1b[31m\x1b[0m"], cleaning={"strip_ansi": True})
    with pytest.raises(UserError, match="corpus x is empty after cleaning"):
        prepare(["", ""])
    with pytest.raises(UserError, match="split 'val'.*val_fraction=0.01, test_fraction=0.15"):
        prepare(["abcdefghij"], val_fraction=0.01, test_fraction=0.15)
    with pytest.raises(UserError, match="split 'val'.*more than 2 document.*split_by=contig"):
        prepare(["one document", "another"], val_fraction=0.01)
    with pytest.raises(UserError, match="unknown cleaning option"):
        prepare(["x"], cleaning={"lowercase": True})
    with pytest.raises(UserError, match="sum to less than 1"):
        prepare(["x"], val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match="split_by='random' is not one of"):
        prepare(["x"], split_by="random")
    with pytest.raises(UserError, match="num_proc=0 must be at least 1"):
        prepare(["x"], num_proc=0)
    with pytest.raises(UserError, match="tokenizer_sample_chars=0"):
        prepare(["x"], tokenizer="bpe", vocab_size=300, tokenizer_sample_chars=0)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_token_shards_read_as_one_sequence(tmp_path):
    parts = [np.arange(0, 5), np.arange(5, 12), np.arange(12, 13), np.arange(13, 30)]
    files = []
    for i, part in enumerate(parts):
        files.append(tmp_path / f"{i}.bin")
        part.astype(np.uint16).tofile(files[-1])
    shards = TokenShards(files, [len(p) for p in parts], "uint16")
    whole = np.arange(30)
    assert len(shards) == 30 and np.array_equal(np.asarray(shards), whole)
    for start, stop in ((0, 30), (3, 14), (5, 12), (11, 13), (29, 30), (7, 7)):
        assert np.array_equal(shards[start:stop], whole[start:stop])
    starts = np.array([0, 4, 10, 12, 20])
    assert np.array_equal(shards.windows(starts, 6), whole[starts[:, None] + np.arange(6)])


def test_clean_text_options():
    noisy = "\x1b[1;31mred\x1b[0m \x1b]0;title\x07ok\x1b]8;;http://x\x1b\\link"
    assert clean_text(noisy, strip_ansi=True) == "red oklink"
    assert clean_text("a\x00b\x07c\td\ne\x85f\x7f", strip_control=True) == "abc\td\nef"
    messy = "a  \t b   \r\nc\rd \n \n\n\n\ne\t"
    assert clean_text(messy, normalize_whitespace=True) == "a b\nc\nd\n\ne"
    assert clean_text("x\r\ny\rz", normalize_whitespace=True, strip_control=True) == "x\ny\nz"
    assert clean_text(noisy + messy) == noisy + messy


def test_tokens_are_uint32_when_the_vocabulary_needs_it(tmp_path):
    chars = "".join(map(chr, range(0x10000, 0x10000 + 70_000)))  # more than 65,536 characters
    source = write_files(tmp_path / "big", [chars + chars[:7_000]])
    prepared = prepare_corpus(source, name="u", cache_dir=tmp_path / "cache", progress=False)
    assert prepared.meta["dtype"] == "uint32" and prepared.tokenizer.vocab_size == 70_000
    assert prepared.tokenizer.decode(np.asarray(prepared.tokens("val")).tolist()) == (
        (chars + chars[:7_000])[int(77_000 * 0.9):])
    assert isinstance(prepared.tokenizer, Tokenizer)
