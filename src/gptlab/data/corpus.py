"""Raw documents to packed token files, cached on disk by everything that affects the tokens.

Documents are joined with a blank line ("\\n\\n") for every tokenizer kind, so one document is
used unchanged (Tiny Shakespeare splits exactly as in nanoGPT) and a char vocabulary needs no
extra symbol. The joined text is cleaned and cut contiguously by characters into train, val
and test, in that order.

A cache folder `<cache_dir>/<name>-<key>` appears atomically: everything is written to a temp
folder next to it, which is renamed into place at the end. An interrupted run leaves no half
cache (a killed process may leave a `.tmp-*` folder, which is never read), and two runs racing
on the same key both end up with the winner's identical copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.data.tokenizers import KINDS, Tokenizer, text_pieces, train_tokenizer
from gptlab.errors import UserError

FORMAT_VERSION = 1
DOCUMENT_SEPARATOR = "\n\n"
_ENCODE_CHUNK_CHARS = 1 << 20

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


@dataclass
class PreparedCorpus:
    """A cache folder: `<split>.bin` token files, tokenizer.json and meta.json."""

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

    def tokens(self, split: str) -> np.memmap:
        self._check_split(split)
        return np.memmap(self.root / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

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


def prepare_corpus(
    documents: Sequence[str] | Callable[[], Sequence[str]],
    *,
    name: str,
    source_key: str,
    cache_dir: Path,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    cleaning: dict | None = None,
    progress: bool = True,
) -> PreparedCorpus:
    """Tokenize documents into a cache folder, or reuse the folder made with the same inputs.

    `source_key` must change whenever the documents do (e.g. their sha256); it stands in for
    them in the cache key, so a callable `documents` is only called on a cache miss. A
    Tokenizer object is used as is (a checkpoint's tokenizer); a kind string trains one: char
    on the whole text, bpe on the train split only.
    """
    _check_name(name)
    options = _cleaning_options(cleaning)
    _check_fractions(val_fraction, test_fraction)
    spec = _tokenizer_spec(tokenizer, vocab_size)
    key_source = [source_key, options, val_fraction, test_fraction, spec, FORMAT_VERSION]
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    root = cache_dir / f"{name}-{key}"
    if (root / "meta.json").is_file():
        return PreparedCorpus.open(root, from_cache=True)
    if root.exists():
        raise UserError(
            f"cache folder {root} exists but has no meta.json (damaged or not made by "
            "gptlab); delete it and run again"
        )
    docs = documents() if callable(documents) else documents
    meta = {
        "name": name,
        "source_key": source_key,
        "format_version": FORMAT_VERSION,
        "options": {
            "cleaning": options,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "tokenizer": tokenizer if isinstance(tokenizer, str) else "given",
            "vocab_size": vocab_size,
            "document_separator": DOCUMENT_SEPARATOR,
        },
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir))
    try:
        _write_corpus(tmp, docs, tokenizer, vocab_size, meta, progress)
        won = _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedCorpus.open(root, from_cache=not won)


def split_text(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Cut contiguously: train first, then val, then test (nanoGPT's split for val only)."""
    n = len(text)
    train_end = int(n * (1 - val_fraction - test_fraction))
    val_end = int(n * (1 - test_fraction))
    splits = {"train": text[:train_end]}
    if val_fraction > 0:
        splits["val"] = text[train_end:val_end]
    if test_fraction > 0:
        splits["test"] = text[val_end:]
    return splits


def _write_corpus(
    folder: Path,
    documents: Sequence[str],
    tokenizer: str | Tokenizer,
    vocab_size: int | None,
    meta: dict,
    progress: bool,
) -> None:
    name, options = meta["name"], meta["options"]
    text = clean_text(DOCUMENT_SEPARATOR.join(documents), **options["cleaning"])
    if not text:
        raise UserError(f"corpus {name} is empty after cleaning; check the files/options")
    splits = split_text(text, options["val_fraction"], options["test_fraction"])
    for split, part in splits.items():
        if not part:
            raise UserError(
                f"split {split!r} of corpus {name} gets no text ({len(text)} characters in all, "
                f"val_fraction={options['val_fraction']}, "
                f"test_fraction={options['test_fraction']}); use more text or other fractions"
            )
    tok = _make_tokenizer(tokenizer, vocab_size, text, splits["train"])
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    meta.update(
        tokenizer_kind=tok.kind, vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name, splits={}
    )
    for split, part in splits.items():
        n_tokens = _encode_to_file(tok, part, folder / f"{split}.bin", dtype, progress, name, split)
        meta["splits"][split] = {
            "tokens": n_tokens,
            "bytes": len(part.encode("utf-8")),
            "chars": len(part),
        }
    tok.save(folder / "tokenizer.json")
    # meta.json last: its presence marks a complete folder.
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _make_tokenizer(
    tokenizer: str | Tokenizer, vocab_size: int | None, text: str, train_text: str
) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer == "char":
        return train_tokenizer("char", [text])
    return train_tokenizer("bpe", text_pieces(train_text, 1 << 16), vocab_size)


def _encode_to_file(
    tok: Tokenizer, text: str, path: Path, dtype: type, progress: bool, name: str, split: str
) -> int:
    n_tokens = 0
    with (
        open(path, "wb") as f,
        tqdm(
            total=len(text),
            unit="char",
            unit_scale=True,
            desc=f"encode {name}/{split}",
            disable=not progress,
        ) as bar,
    ):
        for piece in text_pieces(text, _ENCODE_CHUNK_CHARS):
            ids = np.asarray(tok.encode(piece), dtype=dtype)
            ids.tofile(f)
            n_tokens += len(ids)
            bar.update(len(piece))
    return n_tokens


def _publish(tmp: Path, root: Path) -> bool:
    """Move tmp into place; False if a concurrent run published the same key first."""
    try:
        os.rename(tmp, root)
    except OSError:
        if not (root / "meta.json").is_file():
            raise
        return False
    return True


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
        return {"tokenizer_json": tokenizer.to_str()}
    if tokenizer not in KINDS:
        raise UserError(
            f"unknown tokenizer {tokenizer!r}; use one of: {', '.join(KINDS)} "
            "(or a checkpoint's tokenizer)"
        )
    return {"kind": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else None}
