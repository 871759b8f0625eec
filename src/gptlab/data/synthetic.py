"""Random tokens, for measuring speed at a model's real shape without preparing a corpus.

`data=synthetic` feeds uniformly random token windows (the loss stays near log(vocab_size)):
throughput, MFU and memory depend on shapes, not on what the tokens say, so a 124M GPT-2
can be timed on any machine in seconds (bench/gpu_check.sh does). Its tokenizer is a char
vocabulary of `vocab_size` placeholder symbols, so run folders and checkpoints stay complete.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from gptlab.data.tokenizers import Tokenizer, train_tokenizer
from gptlab.errors import UserError

_FIRST_SYMBOL = 0x4E00  # a run of printable code points, one per token


class RandomTokens(IterableDataset):
    """An endless stream of (x, y) batches; batch i depends only on (seed, i)."""

    def __init__(self, vocab_size: int, block_size: int, batch_size: int, seed: int,
                 start_batch: int = 0):
        self.shape, self.vocab_size = (batch_size, block_size + 1), vocab_size
        self.seed, self.start_batch = seed, start_batch

    def __iter__(self):
        index = self.start_batch
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            tokens = torch.randint(self.vocab_size, self.shape, generator=generator)
            yield tokens[:, :-1], tokens[:, 1:]
            index += 1


class SyntheticDataModule(L.LightningDataModule):
    """Random (x, y) windows of block_size tokens from a vocabulary of vocab_size."""

    def __init__(self, vocab_size: int, block_size: int, batch_size: int,
                 eval_batch_size: int | None = None, val_batches: int = 4, seed: int = 0,
                 num_workers: int = 0, tokenizer: Tokenizer | None = None):
        super().__init__()
        if vocab_size < 2 or block_size < 1 or batch_size < 1:
            raise UserError(f"data=synthetic needs vocab_size >= 2, block_size and batch_size "
                            f">= 1 (got {vocab_size}, {block_size}, {batch_size})")
        self.vocab_size, self.block_size, self.batch_size = vocab_size, block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_batches, self.seed, self.num_workers = val_batches, seed, num_workers
        self._tokenizer = tokenizer  # evaluate.py passes the run's

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            symbols = "".join(chr(_FIRST_SYMBOL + i) for i in range(self.vocab_size))
            self._tokenizer = train_tokenizer("char", [symbols])
        return self._tokenizer

    val_windows = None  # evaluate.py: every validation window

    def bytes_per_token(self, split: str = "val") -> float:
        return 1.0  # no text behind the tokens: val/bpb is val/loss in bits

    def task_arguments(self) -> dict:
        return {"val_bytes_per_token": self.bytes_per_token()}

    def train_dataloader(self) -> DataLoader:
        start = 0
        if self.trainer is not None:  # a resumed run continues the stream
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        stream = RandomTokens(self.vocab_size, self.block_size, self.batch_size, self.seed,
                              start)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader()

    def eval_dataloader(self, split: str = "val", max_windows: int | None = None) -> DataLoader:
        n = self.val_batches * self.eval_batch_size
        if max_windows:
            n = min(n, max_windows)
        generator = torch.Generator().manual_seed(self.seed + 1)
        tokens = torch.randint(self.vocab_size, (n, self.block_size + 1), generator=generator)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]),
                          batch_size=self.eval_batch_size)
