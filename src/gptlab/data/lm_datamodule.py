"""The LightningDataModule for language modeling: token shards in, (x, y) windows out.

Training draws random windows across a split's shards (like nanoGPT's get_batch). Batch i is
drawn from a generator seeded by (seed, rank, i), so the sampler's whole state is the batch
index: a resumed run continues the same stream, and DataLoader workers share it out (worker
w of n makes batches w, w + n, ...), so any number of workers gives the same batches.
Evaluation uses fixed, non-overlapping windows so that `val/loss` of two runs is measured on
identical tokens; under DDP each rank scores its own share of them, every token once.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from gptlab.data.corpus import (
    TOKENIZER_SAMPLE_CHARS,
    PreparedCorpus,
    TokenShards,
    cache_key,
    prepare_corpus,
)
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError

IGNORE_INDEX = -1  # target id that the loss skips (tokens already scored by another window)


class RandomWindows(IterableDataset):
    """An endless stream of batches of random (x, y) windows from a split's tokens."""

    def __init__(self, tokens: TokenShards, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, start_batch: int = 0):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.start_batch = seed, rank, start_batch

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, index])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        windows = torch.from_numpy(
            self.tokens.windows(starts, self.block_size + 1).astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self):
        """This worker's share of the stream: batches w, w + n, w + 2n, ... of n workers."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index in itertools.count(self.start_batch + worker, workers):
            yield self.batch(index)


def window_starts(n_tokens: int, block_size: int) -> np.ndarray:
    """Starts of non-overlapping windows covering every target token exactly once.

    The last window is aligned to the end of the split; the targets it shares with the
    window before it are masked out, so nothing is scored twice and nothing is dropped.
    """
    last = n_tokens - block_size - 1
    return np.unique(np.append(np.arange(0, last + 1, block_size), last))


class FixedWindows(Dataset):
    """Deterministic evaluation windows: all of them, or `max_windows` evenly spaced ones.

    Evenly spaced over the whole split, so a sample covers every shard in proportion to its
    size. With `world_size` > 1 this rank keeps every world_size-th window from `rank` on:
    the ranks together score each chosen window once, with no padding.
    """

    def __init__(self, tokens: TokenShards, block_size: int, max_windows: int | None = None,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.block_size = tokens, block_size
        starts = window_starts(len(tokens), block_size)
        # The first target position of each window that no earlier window has scored.
        first_new = np.maximum(0, np.append(0, starts[:-1] + block_size) - starts)
        if max_windows and max_windows < len(starts):
            keep = np.unique(np.linspace(0, len(starts) - 1, max_windows).round().astype(int))
            starts, first_new = starts[keep], first_new[keep]
        if len(starts) < world_size:
            raise UserError(
                f"{len(starts)} evaluation window(s) cannot be shared by {world_size} "
                "processes; use more validation windows (data.val_windows) or fewer devices"
            )
        self.starts, self.first_new = starts[rank::world_size], first_new[rank::world_size]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[i])
        window = torch.from_numpy(
            self.tokens[start : start + self.block_size + 1].astype(np.int64)
        )
        y = window[1:].clone()
        y[: self.first_new[i]] = IGNORE_INDEX
        return window[:-1], y


def check_loader_options(batch_size: int, eval_batch_size: int | None, num_workers: int) -> None:
    """One line per bad value: a batch of 0 would train on a NaN loss, not fail."""
    for key, value, least in (("batch_size", batch_size, 1), ("eval_batch_size",
                              eval_batch_size, 1), ("num_workers", num_workers, 0)):
        if value is not None and value < least:
            raise UserError(f"data.{key}={value} must be at least {least}")


class LMDataModule(L.LightningDataModule):
    """Prepares a corpus (cached) and serves training, validation and full-split windows."""

    def __init__(
        self,
        name: str,
        source,
        block_size: int,
        batch_size: int,
        tokenizer: str | Tokenizer = "char",
        vocab_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        cleaning: dict | None = None,
        split_by: str = "auto",
        document_separator: str = "\n\n",
        tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
        val_windows: int | None = 100,
        eval_batch_size: int | None = None,
        cache_dir: str = "data/cache",
        seed: int = 0,
        num_workers: int = 0,
        num_proc: int | None = None,
    ):
        super().__init__()
        check_loader_options(batch_size, eval_batch_size, num_workers)
        self.name, self.source = name, source
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.corpus_options = {
            "tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "cleaning": dict(cleaning or {}),
            "split_by": split_by, "document_separator": document_separator,
            "tokenizer_sample_chars": tokenizer_sample_chars,
        }
        self.val_windows, self.cache_dir = val_windows, Path(cache_dir)
        self.seed, self.num_workers, self.num_proc = seed, num_workers, num_proc
        self._corpus: PreparedCorpus | None = None

    # -- corpus --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.corpus  # noqa: B018  (prepares the cache on first access)

    def fingerprint(self) -> str:
        """What the prepared tokens depend on (source content and options), without reading
        or preparing the corpus: equal fingerprints mean identical token shards."""
        return cache_key(self.source, **self.corpus_options)

    @property
    def corpus(self) -> PreparedCorpus:
        if self._corpus is None:
            self._corpus = prepare_corpus(self.source, name=self.name, cache_dir=self.cache_dir,
                                          num_proc=self.num_proc, **self.corpus_options)
            self._check_lengths()
        return self._corpus

    def _check_lengths(self) -> None:
        for split in self._corpus.splits:
            n = len(self._corpus.tokens(split))
            if n <= self.block_size:
                raise UserError(
                    f"the {split} split of corpus '{self.name}' has {n} tokens, too few for "
                    f"windows of block_size={self.block_size}; use a larger corpus or a "
                    f"smaller model.block_size"
                )

    @property
    def tokenizer(self) -> Tokenizer:
        return self.corpus.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.corpus.tokenizer.vocab_size

    def bytes_per_token(self, split: str = "val") -> float:
        return self.corpus.bytes_per_token(split)

    def task_arguments(self) -> dict:
        """What the task's constructor needs from the data: bytes per token, for val/bpb."""
        return {"val_bytes_per_token": self.bytes_per_token("val")}

    # -- loaders -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, consumed = 0, 0
        if self.trainer is not None:  # a resumed run continues the stream where it stopped
            rank = self.trainer.global_rank
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        stream = RandomWindows(self.corpus.tokens("train"), self.block_size, self.batch_size,
                               self.seed, rank, consumed)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val", self.val_windows)

    def eval_dataloader(self, split: str = "val", max_windows: int | None = None) -> DataLoader:
        """Windows of one split; `max_windows=None` covers every token of the split.

        Under DDP (a trainer with several processes) each rank gets its share of the windows,
        so the task must run with `trainer.use_distributed_sampler: false`.
        """
        if split not in self.corpus.splits:
            raise UserError(
                f"corpus '{self.name}' has no '{split}' split; it has {self.corpus.splits}"
            )
        rank, world_size = 0, 1
        if self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
        windows = FixedWindows(self.corpus.tokens(split), self.block_size, max_windows,
                               rank, world_size)
        return DataLoader(windows, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)
