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
