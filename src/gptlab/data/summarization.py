"""Summarization data: AESLC (email body -> subject line) and its extra references.

The Annotated Enron Subject Line Corpus (Zhang & Tetreault, ACL 2019) has one file per email:
the body, a line `@subject` and the subject its sender wrote; in dev and test `@ann0`..`@ann2`
follow, three subjects written by annotators. The sender's subject is the training target
(and the reference of the PEGASUS convention); the annotations are the references of the
AESLC paper's convention. The corpus is read from the mirror (`aeslc/enron_subject_line`) or
downloaded once as the repository's archive, pinned by a digest of its files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rouge_score.rouge_scorer import RougeScorer

from gptlab.data import sources
from gptlab.data.finetune import Seq2SeqDataModule
from gptlab.errors import UserError

_COMMIT = "7afc087a1cc234d07121f0d4a2d87102ddceabc2"
AESLC = sources.RemoteFolder(
    "aeslc/enron_subject_line",
    f"https://github.com/ryanzhumich/AESLC/archive/{_COMMIT}.zip",
    "fe546742ad11630bfb9314ec70a2896ebb1f31cfe1b9edc6604d8d1e2c0f99f8",
    member=f"AESLC-{_COMMIT}/enron_subject_line/",
)
_ROUGE1 = RougeScorer(["rouge1"])
_TAG = re.compile(r"^(@subject|@ann\d)[ \t]*$", re.MULTILINE)


@dataclass
class Email:
    body: str  # whitespace collapsed to single spaces: one line per email
    subject: str
    annotations: list[str]


def parse_email(text: str, where: str) -> Email:
    """One AESLC file: body, `@subject` and its line, then optional `@annN` and theirs."""
    parts = _TAG.split(text)
    fields = {tag: value.strip() for tag, value in zip(parts[1::2], parts[2::2], strict=True)}
    if "@subject" not in fields:
        raise UserError(f"{where} has no '@subject' line; AESLC files end with '@subject' and "
                        f"the subject line (replace the file with the corpus's own)")
    annotations = [fields[tag] for tag in sorted(fields) if tag.startswith("@ann")]
    return Email(" ".join(parts[0].split()), fields["@subject"], annotations)


class Aeslc:
    """(email body, sender's subject) pairs; `annotations` gives the annotators' subjects."""

    SPLITS = {"train": "train", "val": "dev", "test": "test"}  # ours -> the corpus's folders

    def __init__(self, download_dir: str | None = None):
        self.download_dir = download_dir
        self._root: Path | None = None
        self._emails: dict[str, list[Email]] = {}

    @property
    def splits(self) -> list[str]:
        return list(self.SPLITS)

    def emails(self, split: str) -> list[Email]:
        if split not in self._emails:
            if self._root is None:
                self._root = sources.locate_folder(
                    AESLC, Path(self.download_dir) if self.download_dir else None)
            files = sorted((self._root / self.SPLITS[split]).glob("*.subject"))
            self._emails[split] = [parse_email(sources.read_text(f), str(f)) for f in files]
        return self._emails[split]

    def examples(self, split: str) -> list[tuple[str, str]]:
        return [(email.body, email.subject) for email in self.emails(split)]

    def annotations(self, split: str) -> list[list[str]]:
        """The annotators' subjects of each email (none in train)."""
        return [email.annotations for email in self.emails(split)]


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
# An email's salutation ("Hi Phillip,", "Dear all:"): up to 3 words, then a capital.
_SALUTATION = re.compile(r"^((?:\S+ ){0,2}\S+?[,:])\s+(?=[A-Z])")


def principal_sentence(text: str, lead_words: int, target_words: int) -> str:
    """The sentence of `text`'s first `lead_words` words that shares the most words with the
    rest of the text (ROUGE-1 F against it, as PEGASUS chooses its gap sentences), cut to
    `target_words` words. A salutation counts as a sentence of its own."""
    words = text.split()
    head = _SALUTATION.sub(r"\1\n", " ".join(words[:lead_words]))
    sentences = [s for line in head.split("\n") for s in _SENTENCE_END.split(line)
                 if len(s.split()) >= 2]
    if not sentences:
        return " ".join(words[:target_words])
    context = " ".join(words[: 3 * lead_words])
    best = max(sentences, key=lambda s: _ROUGE1.score(context.replace(s, " "), s)["rouge1"]
               .fmeasure)
    return " ".join(best.split()[:target_words])


class GapSentences:
    """Summaries that unlabeled documents write themselves: PEGASUS's gap-sentence objective
    (Zhang et al. 2020) in its "Ind-Orig" form, for pretraining an encoder-decoder (or a GPT)
    on the AESLC train bodies alone before it learns their subjects (task.init_from).

    Source: the body; target: its principal sentence among the first `lead_words` words (the
    part the summarization recipes read), cut to `target_words`. The sentence stays in the
    source, so the model learns to find the salient part of a body and copy it. No subject
    and nothing of dev or test is read: val is the last `val_documents` train bodies.
    """

    def __init__(self, download_dir: str | None = None, val_documents: int = 500,
                 lead_words: int = 40, target_words: int = 10):
        self.corpus, self.val_documents = Aeslc(download_dir), val_documents
        self.lead_words, self.target_words = lead_words, target_words
        self._examples: dict[str, list[tuple[str, str]]] = {}

    @property
    def splits(self) -> list[str]:
        return ["train", "val"]

    def examples(self, split: str) -> list[tuple[str, str]]:
        if not self._examples:
            bodies = [email.body for email in self.corpus.emails("train")]
            if not 0 < self.val_documents < len(bodies):
                raise UserError(f"data.source.val_documents={self.val_documents} must be "
                                f"between 1 and {len(bodies) - 1} (the train bodies)")
            pairs = [(body, principal_sentence(body, self.lead_words, self.target_words))
                     for body in bodies]
            self._examples = {"train": pairs[: -self.val_documents],
                              "val": pairs[-self.val_documents:]}
        return self._examples[split]

    def annotations(self, split: str) -> list[list[str]]:
        return [[] for _ in self.examples(split)]


class SummarizationDataModule(Seq2SeqDataModule):
    """Text pairs plus, where the source has them, each example's extra references
    (`annotations`, e.g. AESLC's annotators' subjects), which the summarization task scores
    against besides the target."""

    def encode(self, split: str) -> list[dict]:
        rows = super().encode(split)
        annotations = self.source.annotations(split)
        for row, extra in zip(rows, annotations, strict=True):
            row["annotations"] = extra
        return rows

    def collate(self, rows: list[dict]) -> dict:
        return super().collate(rows) | {"annotations": [r["annotations"] for r in rows]}
