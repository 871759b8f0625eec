"""LightningDataModules for fine-tuning: labeled texts (classification) and text pairs (seq2seq).

Examples are small enough to tokenize in memory at start-up (SST-2's 67k phrases take about a
second). Every input ends with "<|endoftext|>": GPT-1's extract token, whose hidden state the
classifier reads, and the end of a translation. A text-to-text example is
`source <|sep|> target <|endoftext|>` with the loss on the target side only.

Batches are right-padded to their longest row: with causal attention no real token ever
attends to the padding after it, so no attention mask is needed and SDPA keeps its fast
causal kernel. Training batches come from length buckets (`LengthBuckets`), so short
sentences do not pay for long ones.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from gptlab.data.lm_datamodule import IGNORE_INDEX, check_loader_options
from gptlab.data.tokenizers import (
    EOS_TOKEN,
    KINDS,
    SEP_TOKEN,
    Tokenizer,
    from_spec,
    train_tokenizer,
)
from gptlab.errors import UserError

log = logging.getLogger("gptlab")
PAD_ID = 0  # any id works: padding sits after every real token and is never a target


def load_tokenizer(spec: str | Tokenizer, vocab_size: int | None, texts: list[str],
                   special_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """A given Tokenizer, a new one of kind `spec` trained on texts (with <|endoftext|>,
    <|sep|> and `special_tokens`), gpt2 or a tokenizer.json."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec in KINDS:
        return train_tokenizer(spec, texts, vocab_size,
                               special_tokens=[EOS_TOKEN, SEP_TOKEN, *special_tokens])
    return from_spec(spec)


def eos_id(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_id is None:
        raise UserError(
            f"the tokenizer has no {EOS_TOKEN!r} token, which fine-tuning appends to every "
            f"input; use a bpe tokenizer (it always has one) or train a new one "
            f"(data.tokenizer=bpe)"
        )
    return tokenizer.eos_id


def separator_id(tokenizer: Tokenizer) -> int:
    """<|sep|> between source and target; tokenizers without it use <|endoftext|>."""
    sep = tokenizer.token_to_id(SEP_TOKEN)
    return eos_id(tokenizer) if sep is None else sep


def encode_texts(tokenizer: Tokenizer, texts: list[str], block_size: int) -> list[list[int]]:
    """Classifier inputs: text tokens (cut to fit the context) then <|endoftext|>."""
    return with_eos(tokenizer.encode_batch(texts), block_size, eos_id(tokenizer))


def with_eos(rows: list[list[int]], block_size: int, eos: int) -> list[list[int]]:
    return [ids[: block_size - 1] + [eos] for ids in rows]


def source_limit(max_source_tokens: int | None, block_size: int) -> int:
    """The longest text-to-text prompt (source + <|sep|>): by default half the context."""
    return max_source_tokens or block_size // 2


def with_prefix_space(texts: list[str], prefix_space: bool) -> list[str]:
    """The texts with a space in front when prefix_space: byte-level BPE tokenizes a text's
    first word unlike the same word inside a sentence ("Meeting" vs " Meeting"), and a
    summary that copies a body's words needs the body's tokens for them."""
    return [" " + text for text in texts] if prefix_space else texts


def encode_sources(tokenizer: Tokenizer, texts: list[str], max_tokens: int,
                   prefix_space: bool = False) -> list[list[int]]:
    """Prompts for text-to-text: source tokens (cut to fit) then <|sep|>, max_tokens in all."""
    sep = separator_id(tokenizer)
    return [ids[: max_tokens - 1] + [sep]
            for ids in tokenizer.encode_batch(with_prefix_space(texts, prefix_space))]


def pad(rows: list[list[int]], value: int = PAD_ID) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class LengthBuckets(Sampler[list[int]]):
    """Batches of similar length, in random order (training) or by length (evaluation).

    Training: an epoch shuffles the examples, cuts them into pools of `pool` batches, sorts
    each pool by length, cuts it into batches and shuffles the batches; its order depends
    only on (seed, epoch). Under DDP rank r takes batches r, r + world_size, ... (the same
    count on every rank). The sampler keeps its own place in the stream of epochs: it starts
    after the first `start` batches of its rank (a resumed run passes the batches it already
    trained on, so it continues mid-epoch exactly) and each new iteration is the next epoch.

    Evaluation: every batch once across the ranks (rank r takes r, r + world_size, ...; no
    padding with repeated batches, so every example is scored exactly once). A split of
    fewer than world_size batches comes in smaller ones, so that every rank has at least one
    where the examples allow (Lightning stops a rank that has none).
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pool: int = 50, start: int = 0):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.pool = rank, world_size, pool
        self.position = start  # batches of this rank handed out so far, over all epochs

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Every batch of one training epoch, for all ranks, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.pool
        batches = []
        for begin in range(0, len(order), span):
            chunk = order[begin : begin + span]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size]
                        for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def _eval_batch_size(self) -> int:
        return max(1, min(self.batch_size, -(-len(self.lengths) // self.world_size)))

    def _by_length(self) -> list[np.ndarray]:
        order, size = np.argsort(self.lengths, kind="stable"), self._eval_batch_size()
        return [order[i : i + size] for i in range(0, len(order), size)]

    def __iter__(self):
        if not self.shuffle:
            for batch in self._by_length()[self.rank :: self.world_size]:
                yield batch.tolist()
            return
        epoch, skip = divmod(self.position, len(self))
        batches = self.epoch_batches(epoch)
        mine = batches[self.rank : len(batches) - len(batches) % self.world_size
                       : self.world_size]
        for batch in mine[skip:]:
            self.position += 1
            yield batch.tolist()

    def __len__(self) -> int:
        if self.shuffle:
            return -(-len(self.lengths) // self.batch_size) // self.world_size
        n = -(-len(self.lengths) // self._eval_batch_size())
        return len(range(self.rank, n, self.world_size))


def evenly_spaced(lengths: list[int], max_tokens: int | None, at_least: int = 1) -> list[int]:
    """Indices of evenly spread examples whose tokens come to about max_tokens (all if None),
    and at least `at_least` of them (one per DDP rank)."""
    if max_tokens is None or sum(lengths) <= max_tokens:
        return list(range(len(lengths)))
    keep = min(len(lengths), max(at_least, int(max_tokens / (sum(lengths) / len(lengths)))))
    return sorted(set(np.linspace(0, len(lengths) - 1, keep).round().astype(int).tolist()))


class FinetuneDataModule(L.LightningDataModule):
    """Reads a split's examples from `source`, tokenizes them once, serves padded batches."""

    special_tokens: tuple[str, ...] = ()  # single tokens of a tokenizer trained here

    def __init__(self, name: str, source, block_size: int, batch_size: int,
                 tokenizer: str | Tokenizer = "bpe", vocab_size: int | None = None,
                 eval_batch_size: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        check_loader_options(batch_size, eval_batch_size, num_workers)
        self.name, self.source = name, source
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.tokenizer_spec, self.vocab_size_wanted = tokenizer, vocab_size
        self.seed, self.num_workers = seed, num_workers
        self._tokenizer: Tokenizer | None = None
        self._examples: dict[str, list[tuple[str, str]]] = {}
        self._encoded: dict[str, list[dict]] = {}

    def prepare_data(self) -> None:
        self.tokenizer  # noqa: B018  (reads the data and makes the tokenizer on first access)

    def examples(self, split: str) -> list[tuple[str, str]]:
        if split not in self._examples:
            if split not in self.source.splits:
                raise UserError(f"data '{self.name}' has no '{split}' split; it has "
                                f"{', '.join(self.source.splits)}")
            self._examples[split] = self.source.examples(split)
        return self._examples[split]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec, self.vocab_size_wanted,
                                             self.tokenizer_texts(), self.special_tokens)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokenizer_texts(self) -> list[str]:
        """What a new tokenizer is trained on: the training split's texts."""
        raise NotImplementedError

    def encode(self, split: str) -> list[dict]:
        """One dict of token lists and fields per example; see `collate`."""
        raise NotImplementedError

    def collate(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    def task_arguments(self) -> dict:
        """What the task's constructor needs from the data (e.g. the label names)."""
        return {}

    def encoded(self, split: str) -> list[dict]:
        if split not in self._encoded:
            self._encoded[split] = self.encode(split)
        return self._encoded[split]

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, rows: list[dict], shuffle: bool) -> DataLoader:
        rank, world, start = 0, 1, 0
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            if shuffle:  # a resumed run goes on after the batches it already trained on
                start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        buckets = LengthBuckets([len(r["input_ids"]) for r in rows],
                                self.batch_size if shuffle else self.eval_batch_size,
                                shuffle, self.seed, rank, world, start=start)
        # Its own generator: creating an iterator then leaves the global RNG (dropout) alone.
        return DataLoader(rows, batch_sampler=buckets, collate_fn=self.collate,
                          num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.encoded("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def eval_dataloader(self, split: str = "val", max_tokens: int | None = None) -> DataLoader:
        """Every example of a split, or evenly spread ones up to about max_tokens tokens."""
        rows = self.encoded(split)
        ranks = self.trainer.world_size if self.trainer is not None else 1
        keep = evenly_spaced([len(r["input_ids"]) for r in rows], max_tokens, at_least=ranks)
        return self._loader([rows[i] for i in keep] if len(keep) < len(rows) else rows,
                            shuffle=False)


class ClassificationDataModule(FinetuneDataModule):
    """(text, label) examples; labels are the values in the label column (e.g. "0", "1")."""

    def __init__(self, *args, labels: list[str] | None = None,
                 label_names: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._labels = None if labels is None else [str(label) for label in labels]
        self.label_names = label_names

    @property
    def labels(self) -> list[str]:
        """The label values in class-index order: as configured, else sorted from train."""
        if self._labels is None:
            self._labels = sorted({label for _, label in self.examples("train")})
        return self._labels

    def task_arguments(self) -> dict:
        names = self.label_names or self.labels
        if len(names) != len(self.labels):
            raise UserError(f"data.label_names has {len(names)} names for {len(self.labels)} "
                            f"labels ({', '.join(self.labels)}); give one name per label")
        return {"labels": list(names)}

    def tokenizer_texts(self) -> list[str]:
        return [text for text, _ in self.examples("train")]

    def encode(self, split: str) -> list[dict]:
        examples = self.examples(split)
        index = {label: i for i, label in enumerate(self.labels)}
        for text, label in examples:
            if label not in index:
                raise UserError(
                    f"label {label!r} in the {split} split of '{self.name}' (text: "
                    f"{text[:40]!r}) is not one of the labels {', '.join(self.labels)}; fix the "
                    f"data or list every label in data.labels"
                )
        raw = self.tokenizer.encode_batch([text for text, _ in examples])
        ids = with_eos(raw, self.block_size, eos_id(self.tokenizer))
        cut = sum(len(row) > self.block_size - 1 for row in raw)
        if cut:
            log.warning("%d of %d %s texts of '%s' were cut to fit block_size=%d tokens",
                        cut, len(ids), split, self.name, self.block_size)
        return [{"input_ids": row, "label": index[label]}
                for row, (_, label) in zip(ids, examples, strict=True)]

    def collate(self, rows: list[dict]) -> dict:
        return {
            "input_ids": pad([r["input_ids"] for r in rows]),
            "lengths": torch.tensor([len(r["input_ids"]) for r in rows]),
            "labels": torch.tensor([r["label"] for r in rows]),
        }


class Seq2SeqDataModule(FinetuneDataModule):
    """(source, target) pairs, trained as one sequence with the loss on the target side.

    A source is cut to `max_source_tokens` (with its <|sep|>; default half the context) and
    the whole row to block_size + 1 tokens, whichever the model's architecture. With
    `prefix_space`, sources and targets are tokenized with a space in front (see
    `with_prefix_space`).
    """

    def __init__(self, *args, max_source_tokens: int | None = None, prefix_space: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if max_source_tokens is not None and not 2 <= max_source_tokens < self.block_size:
            raise UserError(f"data.max_source_tokens={max_source_tokens} must leave room for "
                            f"a target: between 2 and block_size - 1 = {self.block_size - 1} "
                            f"(or null for half the context)")
        self.max_source_tokens = max_source_tokens
        self.prefix_space = prefix_space

    def task_arguments(self) -> dict:
        return {"max_source_tokens": self.max_source_tokens, "prefix_space": self.prefix_space}

    def tokenizer_texts(self) -> list[str]:
        texts = [text for pair in self.examples("train") for text in pair]
        return with_prefix_space(texts, self.prefix_space)

    def encode(self, split: str) -> list[dict]:
        examples = self.examples(split)
        sources = encode_sources(self.tokenizer, [s for s, _ in examples],
                                 source_limit(self.max_source_tokens, self.block_size),
                                 self.prefix_space)
        targets = self.tokenizer.encode_batch(
            with_prefix_space([t for _, t in examples], self.prefix_space))
        eos, rows, cut = eos_id(self.tokenizer), [], 0
        for i, (source, target, (text, reference)) in enumerate(
                zip(sources, targets, examples, strict=True)):
            sequence = source + target + [eos]
            cut += len(sequence) > self.block_size + 1
            sequence = sequence[: self.block_size + 1]
            rows.append({"input_ids": sequence[:-1], "sequence": sequence,
                         "source_len": len(source), "prompt": source, "source": text,
                         "reference": reference, "index": i})
        if cut:
            log.warning("%d of %d %s examples of '%s' were cut to block_size=%d tokens",
                        cut, len(rows), split, self.name, self.block_size)
        return rows

    def collate(self, rows: list[dict]) -> dict:
        """Inputs, next-token targets, and which targets belong to the target side."""
        sequences = pad([r["sequence"] for r in rows], IGNORE_INDEX)
        targets = sequences[:, 1:]
        position = torch.arange(targets.size(1))[None, :]
        source_len = torch.tensor([r["source_len"] for r in rows])[:, None]
        return {
            "input_ids": sequences[:, :-1].masked_fill(sequences[:, :-1] == IGNORE_INDEX, PAD_ID),
            "targets": targets,
            # Position t predicts token t+1: target tokens are predicted from source_len - 1 on.
            "target_mask": (position >= source_len - 1) & (targets != IGNORE_INDEX),
            "source_lens": source_len[:, 0],
            "prompts": [r["prompt"] for r in rows],
            "sources": [r["source"] for r in rows],
            "references": [r["reference"] for r in rows],
            "indices": [r["index"] for r in rows],
        }
