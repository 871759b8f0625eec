"""Training and evaluation windows of the LM DataModule: streams, workers, ranks, shards."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gptlab.data import corpus
from gptlab.data.corpus import TokenShards
from gptlab.data.documents import TextFiles
from gptlab.data.lm_datamodule import IGNORE_INDEX, FixedWindows, LMDataModule, RandomWindows
from gptlab.errors import UserError


def shards_of(tmp_path: Path, tokens: np.ndarray, cuts: list[int]) -> TokenShards:
    """tokens stored as several shards, cut at `cuts`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    files, parts = [], np.split(tokens, cuts)
    for i, part in enumerate(parts):
        files.append(tmp_path / f"shard{i}.bin")
        part.astype(np.uint16).tofile(files[-1])
    return TokenShards(files, [len(p) for p in parts], "uint16")


def test_random_windows_are_next_token_pairs_and_depend_only_on_seed_and_index(tmp_path):
    tokens = shards_of(tmp_path, np.arange(1000), [])
    stream = RandomWindows(tokens, block_size=8, batch_size=4, seed=3)
    x, y = next(iter(stream))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    # Batch i is the same whether the stream starts at 0 or resumes at i: resumable state.
    batches = iter(stream)
    for _ in range(5):
        last = next(batches)
    resumed = next(iter(RandomWindows(tokens, 8, 4, seed=3, start_batch=4)))
    assert all(torch.equal(a, b) for a, b in zip(last, resumed, strict=True))
    other_rank = next(iter(RandomWindows(tokens, 8, 4, seed=3, rank=1)))
    assert not torch.equal(other_rank[0], x)


def test_random_windows_cross_shards_as_if_they_were_one_array(tmp_path):
    one = RandomWindows(shards_of(tmp_path / "a", np.arange(3000), []), 16, 8, seed=1)
    many = RandomWindows(shards_of(tmp_path / "b", np.arange(3000), [5, 700, 701, 2000]),
                         16, 8, seed=1)
    for i in range(20):
        assert all(torch.equal(a, b) for a, b in zip(one.batch(i), many.batch(i), strict=True))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores
@pytest.mark.parametrize("workers", [2, 3])
def test_dataloader_workers_share_the_stream_without_repeating_it(tmp_path, workers):
    """Issue 10.5: with workers, batch i is still batch i of the one-process stream."""
    stream = RandomWindows(shards_of(tmp_path, np.arange(5000), [2500]), 8, 4, seed=5,
                           start_batch=3)
    expected = list(itertools.islice(iter(stream), 7))
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    got = list(itertools.islice(iter(loader), 7))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("n_tokens", [17, 100, 101, 129])
def test_full_split_windows_score_every_target_exactly_once(tmp_path, n_tokens):
    windows = FixedWindows(shards_of(tmp_path, np.arange(n_tokens), [n_tokens // 3]), 16)
    scored = []
    for i in range(len(windows)):
        x, y = windows[i]
        assert torch.equal(x[1:], torch.arange(x[0] + 1, x[0] + 16))
        scored += y[y != IGNORE_INDEX].tolist()
    assert sorted(scored) == list(range(1, n_tokens))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_the_windows_and_score_every_target_once(tmp_path, world_size):
    """Under DDP no window is repeated to pad a rank: each target is scored by one rank."""
    tokens = shards_of(tmp_path, np.arange(1000), [400])
    scored = []
    for rank in range(world_size):
        windows = FixedWindows(tokens, 16, rank=rank, world_size=world_size)
        scored += [t for i in range(len(windows)) for t in windows[i][1].tolist()
                   if t != IGNORE_INDEX]
    assert sorted(scored) == list(range(1, 1000))
    with pytest.raises(UserError, match="2 evaluation window.*3 processes"):
        FixedWindows(tokens, 16, max_windows=2, rank=0, world_size=3)


def test_fixed_subset_is_deterministic_and_spread_over_every_shard(tmp_path):
    tokens = shards_of(tmp_path, np.arange(10_000), [1000, 2000, 9000])
    a, b = FixedWindows(tokens, 16, max_windows=10), FixedWindows(tokens, 16, max_windows=10)
    assert len(a) == 10 and list(a.starts) == list(b.starts)
    assert a.starts[0] == 0 and a.starts[-1] > 9_000
    # Evenly spaced over the split: each shard gets windows in proportion to its length.
    per_shard = np.bincount(np.searchsorted(tokens.offsets, a.starts, side="right") - 1)
    assert per_shard.tolist() == [1, 1, 7, 1]


def write(tmp_path, text: str, name: str = "corpus.txt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_datamodule_prepares_a_corpus_and_serves_batches(tmp_path):
    dm = LMDataModule("t", TextFiles([write(tmp_path, "hello world. " * 200)]), block_size=8,
                      batch_size=2, val_windows=3, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    assert dm.vocab_size == len(set("hello world. "))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 8)
    assert len(dm.val_dataloader().dataset) == 3
    assert dm.tokenizer.decode(x[0].tolist()) in "hello world. " * 3


def test_eval_windows_follow_the_trainers_rank(tmp_path):
    dm = LMDataModule("t", TextFiles([write(tmp_path, "hello world. " * 400)]), block_size=8,
                      batch_size=2, cache_dir=str(tmp_path / "cache"))
    whole = dm.eval_dataloader("val").dataset
    shares = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        shares.append(dm.eval_dataloader("val").dataset)
    assert [len(s) for s in shares] == [(len(whole) + 1) // 2, len(whole) // 2]
    assert sorted(np.concatenate([s.starts for s in shares])) == list(whole.starts)


def test_fingerprint_names_the_cache_without_preparing_it(tmp_path, monkeypatch):
    path = write(tmp_path, "hello world. " * 200)
    dm = LMDataModule("t", TextFiles([path]), block_size=8, batch_size=2,
                      cache_dir=str(tmp_path / "cache"))

    def must_not_prepare(*args, **kwargs):
        raise AssertionError("fingerprint() prepared the corpus")

    with monkeypatch.context() as patch:
        patch.setattr(corpus, "_Preparation", must_not_prepare)
        fingerprint = dm.fingerprint()
    assert not (tmp_path / "cache").exists()
    assert dm.corpus.root.name == f"t-{fingerprint[:12]}"
    again = LMDataModule("t", TextFiles([path]), block_size=8, batch_size=2,
                         cache_dir=str(tmp_path / "cache"), num_proc=2, num_workers=1)
    assert again.fingerprint() == fingerprint  # how it is prepared or loaded does not count
    other = LMDataModule("t", TextFiles([path]), block_size=8, batch_size=2, val_fraction=0.2,
                         cache_dir=str(tmp_path / "cache"))
    assert other.fingerprint() != fingerprint


def test_corpus_shorter_than_the_context_is_a_clear_error(tmp_path):
    dm = LMDataModule("t", TextFiles([write(tmp_path, "a short text " * 3)]), block_size=64,
                      batch_size=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="block_size"):
        dm.prepare_data()
