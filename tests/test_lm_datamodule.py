"""Training and evaluation windows of the LM DataModule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptlab.data.documents import TextFiles
from gptlab.data.lm_datamodule import IGNORE_INDEX, FixedWindows, LMDataModule, RandomWindows
from gptlab.errors import UserError


def test_random_windows_are_next_token_pairs_and_depend_only_on_seed_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
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


@pytest.mark.parametrize("n_tokens", [17, 100, 101, 129])
def test_full_split_windows_score_every_target_exactly_once(n_tokens):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    windows = FixedWindows(tokens, block_size=16)
    scored = []
    for i in range(len(windows)):
        x, y = windows[i]
        assert torch.equal(x[1:], torch.arange(x[0] + 1, x[0] + 16))
        scored += y[y != IGNORE_INDEX].tolist()
    assert sorted(scored) == list(range(1, n_tokens))


def test_fixed_subset_is_deterministic_and_spread_over_the_split():
    tokens = np.arange(10_000, dtype=np.uint16)
    a, b = FixedWindows(tokens, 16, max_windows=10), FixedWindows(tokens, 16, max_windows=10)
    assert len(a) == 10 and list(a.starts) == list(b.starts)
    assert a.starts[0] == 0 and a.starts[-1] > 9_000


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


def test_corpus_shorter_than_the_context_is_a_clear_error(tmp_path):
    dm = LMDataModule("t", TextFiles([write(tmp_path, "a short text " * 3)]), block_size=64,
                      batch_size=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="block_size"):
        dm.prepare_data()
