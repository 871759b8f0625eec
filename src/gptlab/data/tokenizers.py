"""Character and byte-level BPE tokenizers, both stored as a standard Hugging Face tokenizer.json.

Both kinds live inside a `tokenizers.Tokenizer`, so a checkpoint carries one file that any HF
tool can read. The kind is not stored as an extra field (the HF loader rejects unknown keys);
it is read back from the model type: WordLevel means "char", BPE means "bpe". That also lets
an existing GPT-2 style byte-level tokenizer.json load as "bpe".

- char: one token per Unicode character of the training text, ids in sorted character order
  (so Tiny Shakespeare gets nanoGPT's 65 ids). Characters outside the vocabulary are an error,
  never silently dropped.
- bpe: GPT-2 style byte-level BPE; all 256 bytes are in the vocabulary, so any UTF-8 text
  round-trips. "<|endoftext|>" (document separator) and "<|sep|>" (source/target separator
  for text-to-text fine-tuning) are always special tokens.
- gpt2: GPT-2's own 50,257-token byte-level BPE, built from its merge ranks (the
  `r50k_base.tiktoken` file that tiktoken downloads, pinned by tiktoken's own sha256; see
  `sources.GPT2_RANKS`), so results set beside nanoGPT's and GPT-2's use the same tokens.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptlab.data import sources
from gptlab.errors import UserError

EOS_TOKEN = "<|endoftext|>"  # ends a document; fine-tuning also ends every input with it
SEP_TOKEN = "<|sep|>"  # between source and target in text-to-text fine-tuning
KINDS = ("char", "bpe")  # kinds that gptlab trains on a corpus
STANDARD = ("gpt2",)  # ready-made tokenizers, by name
_CHAR_PRE_TOKENIZER = {"type": "Split", "pattern": {"Regex": "(?m:.)"}, "behavior": "Isolated",
                       "invert": False}
_MODEL_KINDS = {"WordLevel": "char", "BPE": "bpe"}
_BATCH_PIECE_CHARS = 1 << 16


class Tokenizer:
    """A Hugging Face tokenizer plus the few operations gptlab needs, with user-facing errors."""

    def __init__(self, hf: HFTokenizer) -> None:
        model_type = type(hf.model).__name__
        if model_type not in _MODEL_KINDS:
            raise UserError(
                f"tokenizer model type {model_type!r} is not supported; "
                f"use a tokenizer.json made by gptlab (kinds: {', '.join(KINDS)})"
            )
        self.hf = hf
        self.kind: str = _MODEL_KINDS[model_type]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.hf.token_to_id(EOS_TOKEN)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        # Long texts go through encode_batch in pieces so that they use all cores; the cut
        # points keep the result identical to encoding the text in one go.
        ids: list[int] = []
        for encoding in self._encode_all(text_pieces(text, _BATCH_PIECE_CHARS)):
            ids.extend(encoding.ids)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._encode_all(list(texts))]

    def encode_array(self, texts: Sequence[str]) -> np.ndarray:
        """The ids of `texts`, each encoded on its own, concatenated (uint32): corpus packing.

        Char tokenizers made by gptlab look their characters up in a table (two orders of
        magnitude faster than the general path, same ids); others encode in pieces, as
        `encode` does, without offsets.
        """
        if self._char_table is not None:
            return self._lookup_chars("".join(texts))
        pieces = [piece for text in texts for piece in text_pieces(text, _BATCH_PIECE_CHARS)]
        encodings = self._encode_all(pieces, self.hf.encode_batch_fast)
        return np.fromiter((i for encoding in encodings for i in encoding.ids), dtype=np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        # Keep special tokens so that decode(encode(text)) == text even when text holds them.
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        return self.hf.to_str()

    @classmethod
    def from_str(cls, text: str, origin: str = "<string>") -> Tokenizer:
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"{origin} is not a valid tokenizer.json ({reason}); "
                "delete it and prepare the data again, or point to a good copy"
            ) from exc
        return cls(hf)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(
                f"tokenizer file {path} does not exist; check the path or prepare the data first"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"cannot read tokenizer file {path} ({exc}); check the file or its permissions"
            ) from exc
        return cls.from_str(text, origin=f"tokenizer file {path}")

    def _encode_all(self, texts: list[str],
                    method: Callable[..., list[Encoding]] | None = None) -> list[Encoding]:
        try:
            return (method or self.hf.encode_batch)(texts, add_special_tokens=False)
        except Exception as exc:
            # WordLevel refuses unknown characters with a generic message; name the character.
            unknown = self._unknown_chars(texts) if self.kind == "char" else []
            if not unknown:
                raise
            raise _unknown_char_error(unknown) from exc

    @cached_property
    def _char_table(self) -> np.ndarray | None:
        """Unicode code point -> id (-1: unknown), for char tokenizers of gptlab's own making."""
        spec = json.loads(self.to_str())
        if (self.kind != "char" or spec.get("normalizer") or spec.get("added_tokens")
                or spec.get("pre_tokenizer") != _CHAR_PRE_TOKENIZER):
            return None
        vocab = self.hf.get_vocab(with_added_tokens=False)
        if any(len(char) != 1 for char in vocab):
            return None
        table = np.full(0x110000, -1, dtype=np.int32)
        table[[ord(char) for char in vocab]] = list(vocab.values())
        return table

    def _lookup_chars(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = self._char_table[points]
        if (ids < 0).any():
            raise _unknown_char_error(self._unknown_chars([text]))
        return ids.astype(np.uint32)

    def _unknown_chars(self, texts: list[str]) -> list[str]:
        vocab = self.hf.get_vocab(with_added_tokens=False)
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return sorted(seen.difference(vocab))


def _unknown_char_error(unknown: list[str]) -> UserError:
    char = unknown[0]
    return UserError(
        f"character {char!r} (U+{ord(char):04X}) is not in the char tokenizer's "
        f"vocabulary ({len(unknown)} unknown character(s) in total); a char tokenizer "
        "only knows the characters of its training text: train it on text that "
        "contains them, or use the bpe tokenizer for open text"
    )


def from_spec(spec: str) -> Tokenizer:
    """A ready-made tokenizer: a standard one by name (gpt2), or a tokenizer.json file."""
    if spec == "gpt2":
        return from_tiktoken_ranks(sources.locate(sources.GPT2_RANKS))
    return Tokenizer.load(spec)


def from_tiktoken_ranks(path: str | Path) -> Tokenizer:
    """A byte-level BPE from a tiktoken merge-ranks file (e.g. GPT-2's), with <|endoftext|> last.

    tiktoken stores each token's bytes and rank; the Hugging Face model needs merges, which
    are recovered by running BPE on each token with only the lower ranks (the merge that
    makes the token is the last one). GPT-2's pre-tokenizer regex is ByteLevel's.
    """
    ranks = _read_ranks(Path(path))
    chars = _byte_chars()
    as_text = {token: "".join(chars[b] for b in token) for token in ranks}
    merges = [tuple(as_text[part] for part in _last_merge(ranks, token))
              for token in sorted(ranks, key=ranks.get) if len(token) > 1]
    hf = HFTokenizer(models.BPE(vocab={as_text[t]: r for t, r in ranks.items()}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOS_TOKEN])
    return Tokenizer(hf)


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(sources.read_text(path).splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{path} line {number} is not '<base64 token> <rank>'; give a "
                            "tiktoken merge-ranks file such as GPT-2's") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(
            bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{path} is not a byte-level BPE: its ranks must be 0..n-1 and "
                        "include all 256 single bytes")
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge makes `token`: BPE on its bytes with the lower ranks only."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        rank, i = min((ranks.get(a + b, len(ranks)), i)
                      for i, (a, b) in enumerate(zip(parts[:-1], parts[1:], strict=True)))
        if rank >= ranks[token]:
            raise UserError(f"token {token!r} of rank {ranks[token]} cannot be made from "
                            "lower-ranked tokens; the ranks file is not a BPE")
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (printable Latin-1 as is, the rest from U+0100)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    special_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe"); vocab_size is required for bpe only."""
    if kind == "char":
        return Tokenizer(_train_char(texts, special_tokens))
    if kind == "bpe":
        return Tokenizer(_train_bpe(texts, vocab_size, special_tokens))
    raise UserError(f"unknown tokenizer kind {kind!r}; use one of: {', '.join(KINDS)}")


def _train_char(texts: Iterable[str], special_tokens: Sequence[str]) -> HFTokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise UserError("cannot train a char tokenizer on empty text; give it non-empty texts")
    vocab = {char: i for i, char in enumerate(sorted(chars))}
    hf = HFTokenizer(models.WordLevel(vocab=vocab))
    # "(?m:.)" is Oniguruma's dot that also matches "\n": every character becomes one word.
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m:.)"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(special_tokens))
    return hf


def _train_bpe(
    texts: Iterable[str], vocab_size: int | None, special_tokens: Sequence[str]
) -> HFTokenizer:
    specials = [EOS_TOKEN, SEP_TOKEN,
                *(t for t in special_tokens if t not in (EOS_TOKEN, SEP_TOKEN))]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(specials)
    if vocab_size is None or vocab_size < smallest:
        raise UserError(
            f"bpe tokenizer needs vocab_size >= {smallest} (256 bytes + special tokens), "
            f"got {vocab_size}; set vocab_size, e.g. 4096"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


def text_pieces(text: str, size: int) -> list[str]:
    """Cut text into pieces of about `size` characters whose ids concatenate to those of the whole.

    Cuts go after a lone "\\n" between two non-space characters: both pre-tokenizers (one token
    per character; GPT-2's byte-level regex) always end a pre-token there. Text without such a
    newline stays in one piece.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and not _is_lone_newline(text, cut):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def _is_lone_newline(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()
