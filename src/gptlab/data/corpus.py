"""Documents to token shards, prepared in parallel, cached on disk by everything that makes them.

Preparation streams a source's documents (documents.py) in units of about UNIT_BYTES. Worker
processes (`num_proc`, each on one core) clean and tokenize the units (a corpus of one unit
is done in the calling process); each writes its unit's tokens as one shard per split
(uint16 where the vocabulary fits, else uint32). meta.json lists every split's shards in
order, so a split reads as one token sequence (`TokenShards`, memory-mapped). Memory is
bounded by a few units per process, whatever the size of the corpus.

Splits (`split_by`):
- the source's own splits when it has them (a Hugging Face dataset's `split_names`);
- `contiguous` (the default for one document, e.g. Tiny Shakespeare): the documents joined
  by `document_separator` and cut by characters, train first, then val, then test: nanoGPT's
  split; a corpus that fits in one unit is cleaned and tokenized exactly as one text;
- `document` (the default for several documents): a stable hash of each document's content
  puts the whole document in one split, whatever the order or number of documents; every
  document ends with `document_separator`.

Tokenizers: `char` (every character of the cleaned corpus, in sorted order), `bpe` (trained
on the first `tokenizer_sample_chars` characters of the train split; meta.json says how much
of the split that was), `gpt2`, a tokenizer.json path, or a Tokenizer object (a checkpoint's).
A char or bpe tokenizer trained here keeps the source's `special_tokens` (if it names any, e.g.
the role markers of rendered conversations) as single tokens.

The cache folder `<cache_dir>/<name>-<key>` is keyed by the source's fingerprint and every
option that changes the tokens (`cache_key`), so it is found again without reading the
corpus. It is built in `.partial-<name>-<key>` under a lock file (parallel runs wait for
each other), where each finished unit leaves its shards and a record: an interrupted
preparation resumes from them. The complete folder is renamed into place, so a cache folder
is never half-read. A mistake in the data or options (UserError) removes the partial folder.
"""

from __future__ import annotations

import collections
import fcntl
import itertools
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.data.documents import LM_SPLITS, PART_BYTES, FilePart, Text, digest
from gptlab.data.tokenizers import (
    KINDS,
    STANDARD,
    Tokenizer,
    from_spec,
    text_pieces,
    train_tokenizer,
)
from gptlab.errors import UserError
from gptlab.utils.files import write_atomic

log = logging.getLogger("gptlab")

FORMAT_VERSION = 2
UNIT_BYTES = PART_BYTES  # documents are grouped into units of about this many bytes
SPLIT_BY = ("auto", "contiguous", "document")
TOKENIZER_SAMPLE_CHARS = 100_000_000
_BPE_PIECE_CHARS = 1 << 16  # BPE training reads the sample in pieces of about this size
_ENCODE_CHARS = 1 << 20  # a worker tokenizes about this much text at a time
_MAX_OPEN_SHARDS = 256

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI, e.g. colours \x1b[31m
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC, e.g. window titles and hyperlinks
    r"|\x1b[@-Z\\-_]"  # other two-character escapes
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t and \n, DEL, C1
_CLEANING_DEFAULTS = {"strip_ansi": False, "strip_control": False, "normalize_whitespace": False}


def clean_text(
    text: str,
    *,
    strip_ansi: bool = False,
    strip_control: bool = False,
    normalize_whitespace: bool = False,
) -> str:
    """Remove terminal noise and layout-only whitespace that would waste model capacity."""
    if strip_ansi:
        text = _ANSI.sub("", text)
    if normalize_whitespace:
        # Before strip_control, which would otherwise delete a lone "\r" line break.
        text = re.sub(r"\r\n?", "\n", text)
    if strip_control:
        text = _CONTROL.sub("", text)
    if normalize_whitespace:
        text = re.sub(r"[ \t]+", " ", text)
        text = re.sub(r" +$", "", text, flags=re.MULTILINE)
        text = re.sub(r"\n{3,}", "\n\n", text)
    return text


# -- reading a prepared corpus ------------------------------------------------------------
class TokenShards:
    """One split's shards as one read-only token sequence, memory-mapped as they are read.

    Slices and windows may cross shard boundaries; with one shard, windows are gathered
    exactly as from a single array. Pickles without its open maps (DataLoader workers).
    """

    def __init__(self, files: list[Path], lengths: list[int], dtype: str):
        self.files, self.dtype = list(files), np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._maps: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards supports contiguous slices only")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = [np.empty(0, self.dtype)]
        while start < stop:
            end = min(stop, int(self.offsets[i + 1]))
            parts.append(self._shard(i)[start - self.offsets[i] : end - self.offsets[i]])
            start, i = end, i + 1
        return parts[-1] if len(parts) == 2 else np.concatenate(parts)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """A (len(starts), length) array of the tokens at starts[i] .. starts[i] + length."""
        if len(self.files) == 1:
            return self._shard(0)[starts[:, None] + np.arange(length)]
        return np.stack([self[int(s) : int(s) + length] for s in starts])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:].astype(dtype or self.dtype)

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            if len(self._maps) >= _MAX_OPEN_SHARDS:  # keep file descriptors bounded
                self._maps.popitem(last=False)
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtype, mode="r")
        self._maps.move_to_end(i)
        return self._maps[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": collections.OrderedDict()}


@dataclass
class PreparedCorpus:
    """A cache folder: shards/, tokenizer.json and meta.json (the index)."""

    root: Path
    meta: dict
    tokenizer: Tokenizer
    from_cache: bool = False

    @classmethod
    def open(cls, root: Path, from_cache: bool = False) -> PreparedCorpus:
        root = Path(root)
        try:
            meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(
                f"corpus cache {root} has no readable meta.json ({exc}); delete the folder "
                "and run again"
            ) from exc
        return cls(root, meta, Tokenizer.load(root / "tokenizer.json"), from_cache)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def tokens(self, split: str) -> TokenShards:
        self._check_split(split)
        shards = self.meta["splits"][split]["shards"]
        return TokenShards([self.root / s["file"] for s in shards],
                           [s["tokens"] for s in shards], self.meta["dtype"])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token, to turn nats per token into bits per byte."""
        self._check_split(split)
        counts = self.meta["splits"][split]
        return counts["bytes"] / counts["tokens"]

    def _check_split(self, split: str) -> None:
        if split not in self.meta["splits"]:
            raise UserError(
                f"corpus {self.meta['name']!r} ({self.root}) has no split {split!r}; "
                f"use one of: {', '.join(self.splits)}"
            )


# -- options and the cache key -----------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Every option that changes the tokens; what a worker needs to process a unit."""

    mode: str  # "dataset", "contiguous" or "document"
    tokenizer: dict  # what identifies it: a kind (+ vocab_size), a standard name, or its json's
    # digest
    cleaning: dict
    val_fraction: float
    test_fraction: float
    document_separator: str
    tokenizer_sample_chars: int | None  # bpe only

    def key(self, fingerprint: str) -> str:
        return digest([fingerprint, asdict(self), FORMAT_VERSION])


def corpus_options(
    source,
    *,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    cleaning: dict | None = None,
    split_by: str = "auto",
    document_separator: str = "\n\n",
    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
) -> Options:
    """The checked options, with the split mode resolved for this source."""
    mode = _split_mode(source, split_by)
    if mode != "dataset":
        _check_fractions(val_fraction, test_fraction)
    else:
        val_fraction = test_fraction = 0.0  # the dataset's splits; fractions play no part
    if tokenizer_sample_chars is None or tokenizer_sample_chars <= 0:
        raise UserError(f"data.tokenizer_sample_chars={tokenizer_sample_chars} must be a "
                        "positive number of characters, e.g. 100000000")
    spec = _tokenizer_spec(tokenizer, vocab_size)
    special_tokens = list(getattr(source, "special_tokens", ()))
    if special_tokens and "kind" in spec:  # a tokenizer trained here gets the source's markers
        spec["special_tokens"] = special_tokens
    return Options(mode, spec, _cleaning_options(cleaning), val_fraction, test_fraction,
                   str(document_separator),
                   tokenizer_sample_chars if spec.get("kind") == "bpe" else None)


def cache_key(source, **options) -> str:
    """The cache key of `source` prepared with `options` (see corpus_options); reads no data."""
    return corpus_options(source, **options).key(source.fingerprint())


# -- preparation ---------------------------------------------------------------------------
def prepare_corpus(
    source,
    *,
    name: str,
    cache_dir: Path,
    tokenizer: str | Tokenizer = "char",
    num_proc: int | None = None,
    progress: bool = True,
    **options,
) -> PreparedCorpus:
    """Tokenize a source's documents into a cache folder, or reuse the one made with the same
    content and options. `num_proc`: worker processes (None: one per CPU core)."""
    _check_name(name)
    opts = corpus_options(source, tokenizer=tokenizer, **options)
    workers = _num_proc(num_proc)
    cache_dir = Path(cache_dir)
    root = cache_dir / f"{name}-{opts.key(source.fingerprint())[:12]}"
    if (root / "meta.json").is_file():
        return PreparedCorpus.open(root, from_cache=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{root.name}.lock"):
        if (root / "meta.json").is_file():  # prepared by the run we waited for
            return PreparedCorpus.open(root, from_cache=True)
        if root.exists():
            raise UserError(f"cache folder {root} exists but has no meta.json (damaged or not "
                            "made by gptlab); delete it and run again")
        work = cache_dir / f".partial-{root.name}"
        try:
            _Preparation(source, opts, tokenizer, name, work, workers, progress).run()
        except UserError:
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume: the input must change
            raise
        os.rename(work, root)
    return PreparedCorpus.open(root)


@dataclass(frozen=True)
class Unit:
    """Consecutive documents of about UNIT_BYTES, processed by one worker."""

    index: int
    documents: tuple[Text | FilePart, ...]

    @property
    def nbytes(self) -> int:
        return sum(doc.nbytes for doc in self.documents)

    def signature(self) -> str:
        """Identifies the unit's input, so a resumed preparation reuses only what matches."""
        return digest([(d.path, d.start, d.end, d.key) if isinstance(d, FilePart)
                       else (d.key, d.split) for d in self.documents])


def units(documents: Iterable[Text | FilePart]) -> Iterator[Unit]:
    """Documents grouped in order into units of about UNIT_BYTES (a split's own never mix)."""
    batch: list[Text | FilePart] = []
    size, index = 0, 0
    for doc in documents:
        if batch and (size + doc.nbytes > UNIT_BYTES or doc.split != batch[-1].split):
            yield Unit(index, tuple(batch))
            batch, size, index = [], 0, index + 1
        batch.append(doc)
        size += doc.nbytes
    if batch:
        yield Unit(index, tuple(batch))


@dataclass
class _Job:
    """A unit and what its worker needs; `bounds` (contiguous): [(split, start, end)] in the
    unit's text."""

    unit: Unit
    opts: Options
    folder: Path | None = None
    dtype: str = "uint16"
    bounds: list[tuple[str, int, int]] = field(default_factory=list)


class _Preparation:
    """One preparation in its work folder: scan (if needed), tokenizer, encode, index."""

    def __init__(self, source, opts: Options, tokenizer: str | Tokenizer, name: str,
                 work: Path, num_proc: int, progress: bool):
        self.source, self.opts, self.name, self.work = source, opts, name, work
        self.tokenizer_arg, self.num_proc, self.progress = tokenizer, num_proc, progress

    def run(self) -> None:
        (self.work / "units").mkdir(parents=True, exist_ok=True)
        (self.work / "shards").mkdir(exist_ok=True)
        plan = self._plan()
        tok = self._tokenizer(plan)
        dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
        records = self._encode(tok, plan, dtype)
        meta = self._meta(tok, plan, records, dtype)
        shutil.rmtree(self.work / "units")
        (self.work / "plan.json").unlink()
        write_atomic(self.work / "meta.json", json.dumps(meta, indent=2) + "\n")

    # -- scan: unit lengths (contiguous) and the character set (char) -------------------
    def _plan(self) -> dict:
        path = self.work / "plan.json"
        if path.is_file():
            log.info("Resuming the preparation of %s in %s", self.name, self.work)
            return json.loads(path.read_text(encoding="utf-8"))
        plan: dict = {"unit_chars": None, "charset": None}
        if self.opts.mode == "contiguous" or self.opts.tokenizer.get("kind") == "char":
            lengths, charset = [], set()
            with self._bar(f"scan {self.name}") as bar:
                for n_chars, chars, nbytes in _map("_scan_unit", self._jobs(), self.num_proc):
                    lengths.append(n_chars)
                    charset.update(chars)
                    bar.update(nbytes)
            plan = {"unit_chars": lengths, "charset": "".join(sorted(charset))}
            if self.opts.mode == "contiguous":
                self._check_contiguous(lengths)
        write_atomic(path, json.dumps(plan))
        return plan

    def _check_contiguous(self, lengths: list[int]) -> None:
        total = sum(lengths)
        if total == 0:
            raise UserError(f"corpus {self.name} is empty after cleaning; check the "
                            "files/options")
        for split, start, end in _split_ranges(total, self.opts):
            if end <= start:
                raise UserError(
                    f"split {split!r} of corpus {self.name} gets no text ({total} characters in "
                    f"all, val_fraction={self.opts.val_fraction}, "
                    f"test_fraction={self.opts.test_fraction}); use more text or other fractions"
                )

    # -- tokenizer ----------------------------------------------------------------------
    def _tokenizer(self, plan: dict) -> Tokenizer:
        path = self.work / "tokenizer.json"
        if path.is_file():
            return Tokenizer.load(path)
        spec = self.tokenizer_arg
        special_tokens = self.opts.tokenizer.get("special_tokens", [])
        if isinstance(spec, Tokenizer):
            tok = spec
        elif spec == "char":
            tok = train_tokenizer("char", [plan["charset"]], special_tokens=special_tokens)
        elif spec == "bpe":
            sample = _Counter(self._bpe_sample(plan))
            tok = train_tokenizer("bpe", sample, self.opts.tokenizer["vocab_size"],
                                  special_tokens)
            plan["bpe_sample_chars"] = sample.chars
            write_atomic(self.work / "plan.json", json.dumps(plan))
        else:
            tok = from_spec(spec)
        write_atomic(path, tok.to_str())  # a resumed preparation trusts what it finds
        return tok

    def _bpe_sample(self, plan: dict) -> Iterator[str]:
        """The first tokenizer_sample_chars characters of the train split, in pieces."""
        left = self.opts.tokenizer_sample_chars
        log.info("Training a bpe tokenizer on up to %d characters of the train split of %s",
                 left, self.name)
        for job in self._jobs(plan):
            for text in _train_texts(job):
                part = text[:left]
                left -= len(part)
                yield from text_pieces(part, _BPE_PIECE_CHARS)
                if left <= 0:
                    return

    # -- encode -------------------------------------------------------------------------
    def _encode(self, tok: Tokenizer, plan: dict, dtype: str) -> list[dict]:
        """Records of every unit in order: those an earlier attempt finished, then the rest."""
        records: dict[int, dict] = {}
        totals = {"documents": 0, "tokens": 0}
        with self._bar(f"prepare {self.name}") as bar:

            def done(record: dict) -> None:
                records[record["unit"]] = record
                totals["documents"] += record["documents"]
                totals["tokens"] += sum(part["tokens"] for part in record["splits"].values())
                bar.set_postfix(totals, refresh=False)
                bar.update(record["nbytes"])

            def unfinished() -> Iterator[_Job]:
                for job in self._jobs(plan, dtype):
                    record = self._record(job.unit)
                    if record is None:
                        yield job
                    else:
                        done(record)

            for record in _map("_encode_unit", unfinished(), self.num_proc, tok):
                done(record)
        return [records[i] for i in sorted(records)]

    def _record(self, unit: Unit) -> dict | None:
        """The record of a unit finished by an earlier attempt, if it is this very unit."""
        path = self.work / "units" / f"{unit.index:06d}.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        return record if record["signature"] == unit.signature() else None

    def _meta(self, tok: Tokenizer, plan: dict, records: list[dict], dtype: str) -> dict:
        splits = {}
        for split in LM_SPLITS:
            parts = [r["splits"][split] for r in records if split in r["splits"]]
            if not parts and (split != "test" or self.opts.test_fraction > 0):
                parts = [{"tokens": 0, "bytes": 0, "chars": 0, "documents": 0}]
            if parts:
                splits[split] = _sum_split(parts)
        documents = sum(r["documents"] for r in records)
        self._check_document_splits(splits, records, documents)
        meta = {
            "name": self.name,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.source.fingerprint(),
            "options": {**asdict(self.opts), "tokenizer": self.tokenizer_arg
                        if isinstance(self.tokenizer_arg, str) else "given"},
            "tokenizer_kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "dtype": dtype,
            "documents": documents,
            "splits": splits,
        }
        if "bpe_sample_chars" in plan:
            train_chars = splits["train"]["chars"]
            meta["tokenizer_training"] = {
                "sample_chars": plan["bpe_sample_chars"], "train_chars": train_chars,
                "whole_train_split": plan["bpe_sample_chars"] >= train_chars,
            }
        return meta

    def _check_document_splits(self, splits: dict, records: list[dict], documents: int) -> None:
        if self.opts.mode == "contiguous":
            return  # checked on the scan
        if not sum(r["content_chars"] for r in records):
            raise UserError(f"corpus {self.name} is empty after cleaning; check the "
                            "files/options")
        for split, counts in splits.items():
            if counts["tokens"] == 0:
                how = ("the dataset's split is empty; check data.source.split_names"
                       if self.opts.mode == "dataset" else
                       f"a split by document needs more than {documents} document(s): use "
                       "more documents, other fractions, or data.split_by=contiguous")
                raise UserError(f"split {split!r} of corpus {self.name} gets no text; {how}")

    # -- helpers ------------------------------------------------------------------------
    def _jobs(self, plan: dict | None = None, dtype: str = "uint16") -> Iterator[_Job]:
        """The units of the source, each with its part of the contiguous split (if any)."""
        offsets = None
        if plan and plan["unit_chars"] is not None and self.opts.mode == "contiguous":
            offsets = np.concatenate([[0], np.cumsum(plan["unit_chars"])]).tolist()
            ranges = _split_ranges(offsets[-1], self.opts)
        for unit in units(self.source.documents()):
            job = _Job(unit, self.opts, self.work, dtype)
            if offsets is not None:
                start, end = offsets[unit.index], offsets[unit.index + 1]
                job.bounds = [(split, max(a, start) - start, min(b, end) - start)
                              for split, a, b in ranges if max(a, start) < min(b, end)]
            yield job

    def _bar(self, desc: str) -> tqdm:
        size = self.source.size()
        return tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not self.progress)


class _Counter:
    """Counts the characters of the texts passed through (the BPE sample)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars = iter(texts), 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text)
            yield text


def _sum_split(parts: list[dict]) -> dict:
    total = {key: sum(p[key] for p in parts) for key in ("tokens", "bytes", "chars",
                                                        "documents")}
    total["shards"] = [{"file": p["file"], "tokens": p["tokens"]} for p in parts if p["tokens"]]
    return total


def _split_ranges(total: int, opts: Options) -> list[tuple[str, int, int]]:
    """Contiguous split by characters: train first, then val, then test (nanoGPT's for val)."""
    train_end = int(total * (1 - opts.val_fraction - opts.test_fraction))
    val_end = int(total * (1 - opts.test_fraction))
    ranges = [("train", 0, train_end), ("val", train_end, val_end)]
    return ranges + ([("test", val_end, total)] if opts.test_fraction > 0 else [])


# -- what workers do ------------------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _unit_text(unit: Unit, opts: Options) -> str:
    """Contiguous split: the unit's documents, joined by the separator, cleaned as one text."""
    parts = []
    for i, doc in enumerate(unit.documents):
        if doc.first and (unit.index, i) != (0, 0):
            parts.append(opts.document_separator)
        parts.append(doc.read())
    return clean_text("".join(parts), **opts.cleaning)


def _unit_documents(unit: Unit, opts: Options) -> Iterator[tuple[str, str]]:
    """Split by document or dataset: (split, cleaned text + separator where a document ends)."""
    for doc in unit.documents:
        text = clean_text(doc.read(), **opts.cleaning)
        yield doc.split or _document_split(doc.key, opts), text + (
            opts.document_separator if doc.last else "")


def _train_texts(job: _Job) -> Iterator[str]:
    """The unit's text that falls in the train split."""
    if job.opts.mode == "contiguous":
        text = _unit_text(job.unit, job.opts)
        return (text[start:end] for split, start, end in job.bounds if split == "train")
    return (text for split, text in _unit_documents(job.unit, job.opts) if split == "train")


def _document_split(key: str, opts: Options) -> str:
    """A document's split from its key (a hex digest), uniform in [0, 1)."""
    u = int(key[:16], 16) / 2**64
    if u < opts.val_fraction:
        return "val"
    return "test" if u < opts.val_fraction + opts.test_fraction else "train"


def _scan_unit(job: _Job) -> tuple[int, str, int]:
    """(characters of the unit's contiguous text, its character set, bytes read)."""
    if job.opts.mode == "contiguous":
        texts = [_unit_text(job.unit, job.opts)]
    else:
        texts = [text for _, text in _unit_documents(job.unit, job.opts)]
    seen = np.zeros(0x110000, dtype=bool)
    for text in texts:
        seen[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)] = True
    chars = "".join(map(chr, np.flatnonzero(seen)))
    return sum(map(len, texts)), chars, job.unit.nbytes


def _encode_unit(job: _Job) -> dict:
    """Tokenize a unit into one shard per split; record it (the record marks it done)."""
    unit, opts = job.unit, job.opts
    shards = _ShardWriter(job.folder / "shards", unit.index, job.dtype, _worker_tokenizer)
    content_chars = 0
    if opts.mode == "contiguous":
        text = _unit_text(unit, opts)
        content_chars = len(text)
        for split, start, end in job.bounds:
            shards.add(split, text[start:end], new_document=False)
        documents = sum(doc.first for doc in unit.documents)
    else:
        for doc, (split, text) in zip(unit.documents, _unit_documents(unit, opts), strict=True):
            content_chars += len(text) - (len(opts.document_separator) if doc.last else 0)
            shards.add(split, text, new_document=doc.first)
        documents = sum(doc.first for doc in unit.documents)
    record = {"unit": unit.index, "signature": unit.signature(), "nbytes": unit.nbytes,
              "documents": documents, "content_chars": content_chars, "splits": shards.close()}
    write_atomic(job.folder / "units" / f"{unit.index:06d}.json", json.dumps(record))
    return record


class _ShardWriter:
    """A unit's tokens per split, encoded about _ENCODE_CHARS at a time, written to shards."""

    def __init__(self, folder: Path, index: int, dtype: str, tok: Tokenizer):
        self.folder, self.index, self.dtype, self.tok = folder, index, np.dtype(dtype), tok
        self.pending: dict[str, list[str]] = {}
        self.pending_chars: dict[str, int] = {}
        self.files: dict[str, object] = {}
        self.counts: dict[str, dict] = {}

    def add(self, split: str, text: str, new_document: bool) -> None:
        counts = self.counts.setdefault(split, {"tokens": 0, "bytes": 0, "chars": 0,
                                                "documents": 0})
        counts["chars"] += len(text)
        counts["bytes"] += len(text) if text.isascii() else len(text.encode("utf-8",
                                                                           "surrogatepass"))
        counts["documents"] += new_document
        for piece in text_pieces(text, _ENCODE_CHARS):
            self.pending.setdefault(split, []).append(piece)
            self.pending_chars[split] = self.pending_chars.get(split, 0) + len(piece)
            if self.pending_chars[split] >= _ENCODE_CHARS:
                self._flush(split)

    def close(self) -> dict[str, dict]:
        for split in list(self.pending):
            self._flush(split)
        for split, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())  # the unit's record, written next, vouches for these bytes
            f.close()
            os.replace(self._path(split, ".tmp"), self._path(split))
        for split, counts in self.counts.items():
            counts["file"] = f"shards/{self._path(split).name}"
        return self.counts

    def _flush(self, split: str) -> None:
        texts = self.pending.pop(split, [])
        self.pending_chars[split] = 0
        if not texts:
            return
        ids = self.tok.encode_array(texts)
        if split not in self.files:
            self.files[split] = open(self._path(split, ".tmp"), "wb")  # noqa: SIM115
        ids.astype(self.dtype).tofile(self.files[split])
        self.counts[split]["tokens"] += len(ids)

    def _path(self, split: str, suffix: str = "") -> Path:
        return self.folder / f"{split}-{self.index:06d}.bin{suffix}"


# -- worker processes ----------------------------------------------------------------------
def _init_worker(tokenizer_json: str | None) -> None:
    """A worker tokenizes on one core (the pool is the parallelism) and leaves ^C to the parent."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None


def _map(name: str, jobs: Iterable[_Job], num_proc: int,
         tokenizer: Tokenizer | None = None) -> Iterator:
    """The job function `name` (of this module) over jobs, results in order: one job runs
    here, several in num_proc worker processes.

    At most 2 * num_proc jobs are in flight, so a stream of jobs (and their texts) is never
    read far ahead. On any error, or ^C, the workers are stopped at once.
    """
    global _worker_tokenizer
    jobs = iter(jobs)
    head = list(itertools.islice(jobs, 2))
    if len(head) < 2:
        _worker_tokenizer = tokenizer
        yield from (_call(name, job) for job in head)
        return
    pool = _pool(num_proc, tokenizer)
    try:
        pending: collections.deque = collections.deque()
        for job in itertools.chain(head, jobs):
            pending.append(pool.apply_async(_call, (name, job)))
            while len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _pool(num_proc: int, tokenizer: Tokenizer | None) -> multiprocessing.pool.Pool:
    # Said before the fork, so that HF tokenizers does not warn in each worker that it turns
    # its thread pool off there (the parent may have trained a BPE with it).
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        return context.Pool(num_proc, _init_worker, (tokenizer.to_str() if tokenizer else None,))
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _call(name: str, job: _Job):
    """Run a job function, looked up by name (a forked worker shares this module's state)."""
    return globals()[name](job)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (kept as a small file: removing it would race)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- checks ---------------------------------------------------------------------------------
def _split_mode(source, split_by: str) -> str:
    if split_by not in SPLIT_BY:
        raise UserError(f"data.split_by={split_by!r} is not one of {', '.join(SPLIT_BY)}")
    if source.split_names:
        if split_by != "auto":
            raise UserError(f"data.split_by={split_by} conflicts with data.source.split_names "
                            "(the dataset's own splits); drop one of them")
        return "dataset"
    if split_by == "auto":
        return "contiguous" if source.single_document else "document"
    return split_by


def _num_proc(num_proc: int | None) -> int:
    if num_proc is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    if num_proc < 1:
        raise UserError(f"data.num_proc={num_proc} must be at least 1 (or null: one per core)")
    return num_proc


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise UserError(
            f"corpus name {name!r} is not usable as a folder name; use letters, digits, '.', "
            "'_' and '-'"
        )


def _cleaning_options(cleaning: dict | None) -> dict[str, bool]:
    unknown = sorted(set(cleaning or {}) - set(_CLEANING_DEFAULTS))
    if unknown:
        raise UserError(
            f"unknown cleaning option(s) {', '.join(unknown)}; use: "
            f"{', '.join(_CLEANING_DEFAULTS)}"
        )
    return {key: bool(value) for key, value in {**_CLEANING_DEFAULTS, **(cleaning or {})}.items()}


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise UserError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and "
            "sum to less than 1; e.g. val_fraction=0.1 test_fraction=0"
        )


def _tokenizer_spec(tokenizer: str | Tokenizer, vocab_size: int | None) -> dict:
    """What identifies the tokenizer in the cache key."""
    if isinstance(tokenizer, Tokenizer):
        return {"tokenizer_json": digest(tokenizer.to_str())}
    if tokenizer in KINDS:
        return {"kind": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else None}
    if tokenizer in STANDARD:
        return {"standard": tokenizer}
    path = Path(str(tokenizer)).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.tokenizer={tokenizer!r} is neither one of {', '.join(KINDS + STANDARD)} "
            "nor an existing tokenizer.json file; give one of those"
        )
    return {"tokenizer_json": digest(Tokenizer.load(path).to_str())}
