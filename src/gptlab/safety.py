"""A safety filter for generated text: a blocklist, a classifier, and steering while decoding.

    python generate.py run=<run> safety.blocklist=<file> [safety.classifier=<classify run>]

Every output is checked before it is shown, against the blocklist (words and phrases, whole
words in any case, and /regular expressions/) and by a gptlab classification run whose labels
name the unsafe class (blocked when P(unsafe) >= threshold in any window of its context). A
blocked output is replaced by a fixed refusal, and the reason is logged: the rule with its
file and line, or the classifier's probability. The blocked text itself is not logged.

Steering acts earlier, inside the decoding loop (a logits processor, models/generation.py):
the token that would complete a blocklisted word gets no probability, for each form in which
a tokenizer writes the word (as written, lower case, capitalised, upper case; with and
without a leading space). A model can still spell a word with pieces other than those its
tokenizer makes, or in mixed case, and regular expressions cannot be steered at all, so the
check of the finished output stays whatever steering did.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.checkpoints import find_checkpoint, load_checkpoint
from gptlab.data.finetune import eos_id, pad
from gptlab.data.sources import read_text
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError
from gptlab.models.generation import LogitsProcessor

log = logging.getLogger("gptlab")

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass(frozen=True)
class Rule:
    """One line of a blocklist: a word or phrase (`word` set) or a regular expression."""

    text: str  # the line as written
    where: str  # file:line, for the log
    pattern: re.Pattern
    word: str | None  # the literal that steering bans; None for a regular expression


def word_pattern(word: str) -> re.Pattern:
    """`word` as a whole word (or phrase, any whitespace between its words), in any case."""
    body = r"\s+".join(re.escape(part) for part in word.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def read_blocklist(path: str | Path) -> list[Rule]:
    """The rules of a blocklist file: one per line; `/.../` is a regular expression, `#` a
    comment, anything else a word or phrase."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"safety.blocklist={path} does not exist; give a text file with one "
                        f"word or /regex/ per line")
    rules = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(text) > 2 and text[0] == text[-1] == "/":
            try:
                pattern = re.compile(text[1:-1], re.IGNORECASE)
            except re.error as err:
                raise UserError(f"safety.blocklist {where}: {text} is not a valid regular "
                                f"expression ({err}); fix it, or drop the slashes to match "
                                f"it as a word") from None
            rules.append(Rule(text, where, pattern, None))
        else:
            rules.append(Rule(text, where, word_pattern(text), text))
    if not rules:
        raise UserError(f"safety.blocklist={path} has no rules (only blank or # lines); add "
                        f"one word or /regex/ per line")
    return rules


def word_forms(word: str) -> list[str]:
    """The spellings of a word that steering bans: as written, lower, Capitalised, UPPER,
    each alone and after a space (byte-level BPEs fold a leading space into the token)."""
    cases = dict.fromkeys((word, word.lower(), word[:1].upper() + word[1:], word.upper()))
    return [prefix + case for case in cases for prefix in ("", " ")]


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


class BannedSequences:
    """A logits processor: the last token of a banned token sequence gets no probability in a
    row whose generated tokens end with the rest of the sequence.

    A sequence whose text starts with a letter or digit is banned only at a word boundary
    (the start of the output, or after a token that ends in another character), so banning
    "cat" does not forbid "scatter". The word's end is not known while decoding: a banned
    word is banned as the start of a longer word too.
    """

    def __init__(self, tokenizer: Tokenizer, sequences: Iterable[tuple[list[int], bool]]):
        self.tokenizer = tokenizer
        # prefix length -> prefix -> [(last token, needs a word boundary before the sequence)]
        self.table: dict[int, dict[tuple[int, ...], list[tuple[int, bool]]]] = {}
        for ids, needs_boundary in sequences:
            prefix = tuple(ids[:-1])
            entries = self.table.setdefault(len(prefix), {}).setdefault(prefix, [])
            if (ids[-1], needs_boundary) not in entries:
                entries.append((ids[-1], needs_boundary))
        self.window = max(self.table, default=0) + 1  # prefix + the token before it
        self._texts: dict[int, str] = {}

    @classmethod
    def for_words(cls, tokenizer: Tokenizer, words: Iterable[str]) -> BannedSequences:
        """The token sequences of every form of the words, as this tokenizer writes them."""
        sequences = []
        for form in (form for word in words for form in word_forms(word)):
            try:
                ids = tokenizer.encode(form)
            except UserError:  # a character this (char) tokenizer cannot write at all
                continue
            if ids and tokenizer.decode(ids) == form:
                sequences.append((ids, _is_word_char(form[0])))
        return cls(tokenizer, sequences)

    def __len__(self) -> int:
        return sum(len(entries) for prefixes in self.table.values()
                   for entries in prefixes.values())

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor,
                 prompt_index: torch.Tensor) -> torch.Tensor:
        rows, columns = [], []
        for row, seen in enumerate(tokens[:, -self.window :].tolist()):
            before = tokens.size(1) - len(seen)  # tokens before `seen`: 0 at the start
            for length, prefixes in self.table.items():
                if length > len(seen):
                    continue
                for token, needs_boundary in prefixes.get(tuple(seen[len(seen) - length :]), ()):
                    if not needs_boundary or self._boundary(seen, length, before):
                        rows.append(row)
                        columns.append(token)
        if not rows:
            return logits
        index = (torch.tensor(rows, device=logits.device),
                 torch.tensor(columns, device=logits.device))
        return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))

    def _boundary(self, seen: list[int], length: int, before: int) -> bool:
        """Whether the last `length` tokens of `seen` start at a word boundary."""
        i = len(seen) - length - 1
        if i < 0:
            return before == 0
        text = self._text(seen[i])
        return not text or not _is_word_char(text[-1])

    def _text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]


class Classifier:
    """A gptlab classification run as the judge: P(unsafe label) of a text.

    A text longer than the classifier's context is read in windows that overlap by half,
    and its probability is the largest of its windows', so nothing past the first window
    escapes the check.
    """

    def __init__(self, run: str, unsafe_label: str, threshold: float,
                 device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        path = Path(str(run)).expanduser()
        if not path.exists():
            raise UserError(f"safety.classifier={run} does not exist; give the run folder (or a "
                            f"checkpoint file) of a classification run")
        found, run_dir = find_checkpoint(ckpt=str(path)) if path.is_file() else \
            find_checkpoint(run=str(path))
        checkpoint = load_checkpoint(found, run_dir)
        if checkpoint.artifacts["task"] != "classify":
            raise UserError(f"safety.classifier={run} is a {checkpoint.artifacts['task']} run; "
                            f"give a classification run (task=classify) whose labels include "
                            f"{unsafe_label!r}")
        self.task = checkpoint.task().to(device)
        if unsafe_label not in self.task.labels:
            raise UserError(f"safety.unsafe_label={unsafe_label!r} is not a label of the "
                            f"classifier {run} (its labels: {', '.join(self.task.labels)}); "
                            f"set safety.unsafe_label to the unsafe one")
        self.run, self.label, self.threshold = run, unsafe_label, threshold
        self.unsafe = self.task.labels.index(unsafe_label)
        self.batch_size = batch_size

    def windows(self, ids: list[int]) -> list[list[int]]:
        """Classifier inputs covering ids: windows that fit the context, then <|endoftext|>."""
        size = self.task.model.config.block_size - 1
        stride = max(1, size // 2)
        starts = range(0, max(1, len(ids) - size + stride), stride)
        eos = eos_id(self.task.tokenizer)
        return [ids[start : start + size] + [eos] for start in starts]

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> list[float]:
        """P(unsafe) of each text: the largest over its windows."""
        rows, owner = [], []
        for i, ids in enumerate(self.task.tokenizer.encode_batch(texts)):
            windows = self.windows(ids)
            rows += windows
            owner += [i] * len(windows)
        device = self.task.model.wte.weight.device
        unsafe = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            lengths = torch.tensor([len(r) for r in batch], device=device)
            logits, _ = self.task(pad(batch).to(device), lengths)
            unsafe += logits.float().softmax(-1)[:, self.unsafe].tolist()
        best = [0.0] * len(texts)
        for i, p in zip(owner, unsafe, strict=True):
            best[i] = max(best[i], p)
        return best


class SafetyFilter:
    """What generate.py (and a chat) run on every output: steering, then checks and refusal."""

    def __init__(self, rules: list[Rule], classifier: Classifier | None,
                 refusal: str = DEFAULT_REFUSAL, steer: bool = True) -> None:
        self.rules, self.classifier = rules, classifier
        self.refusal, self.steer = refusal, steer

    @classmethod
    def from_config(cls, cfg: Mapping | None, device: torch.device | str = "cpu"
                    ) -> SafetyFilter | None:
        """The filter that `safety:` of conf/generate.yaml describes; None when it sets
        neither a blocklist nor a classifier."""
        if not cfg or not (cfg.get("blocklist") or cfg.get("classifier")):
            return None
        threshold = float(cfg.get("threshold", 0.5))
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"safety.threshold={threshold} must be in (0, 1]: the probability "
                            f"of the unsafe class from which an output is blocked")
        rules = read_blocklist(cfg["blocklist"]) if cfg.get("blocklist") else []
        classifier = None
        if cfg.get("classifier"):
            classifier = Classifier(cfg["classifier"], str(cfg.get("unsafe_label", "unsafe")),
                                    threshold, device)
        refusal = cfg.get("refusal")
        return cls(rules, classifier, DEFAULT_REFUSAL if refusal is None else str(refusal),
                   bool(cfg.get("steer", True)))

    def processors(self, tokenizer: Tokenizer) -> list[LogitsProcessor]:
        """Logits processors for `generate(..., processors=...)` of a model that uses this
        tokenizer: none without steering or blocklisted words."""
        words = [rule.word for rule in self.rules if rule.word is not None]
        if not (self.steer and words):
            return []
        banned = BannedSequences.for_words(tokenizer, words)
        return [banned] if len(banned) else []

    def reasons(self, texts: list[str]) -> list[str | None]:
        """Why each text is blocked (the first rule that matches, else the classifier), or
        None where it passes."""
        reasons: list[str | None] = [self._rule_reason(text) for text in texts]
        if self.classifier is not None:
            unchecked = [i for i, reason in enumerate(reasons) if reason is None]
            probabilities = self.classifier.probabilities([texts[i] for i in unchecked])
            for i, p in zip(unchecked, probabilities, strict=True):
                if p >= self.classifier.threshold:
                    reasons[i] = (f"classifier {self.classifier.run}: P({self.classifier.label})"
                                  f" = {p:.4f} >= threshold {self.classifier.threshold}")
        return reasons

    def _rule_reason(self, text: str) -> str | None:
        for rule in self.rules:
            if rule.pattern.search(text):
                return f"blocklist rule {rule.text!r} ({rule.where})"
        return None

    def apply_all(self, texts: list[str]) -> list[str]:
        """Each text, or the refusal where it is blocked (the reason is logged)."""
        outputs = []
        for i, (text, reason) in enumerate(zip(texts, self.reasons(texts), strict=True)):
            if reason is not None:
                log.warning("safety: output %d of %d blocked: %s", i + 1, len(texts), reason)
            outputs.append(text if reason is None else self.refusal)
        return outputs

    def apply(self, text: str) -> str:
        """The text, or the refusal if it is blocked (the reason is logged)."""
        (reason,) = self.reasons([text])
        if reason is None:
            return text
        log.warning("safety: output blocked: %s", reason)
        return self.refusal
