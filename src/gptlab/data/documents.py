"""Where the documents of a corpus come from.

A document source is a small object whose `documents()` returns the raw texts. The corpus
cache is keyed on the content of those texts, so editing a file or pointing at another
dataset can never reuse a stale cache.
"""

from __future__ import annotations

import glob
from pathlib import Path

from gptlab.data import examples, sources
from gptlab.errors import UserError


class KnownFile:
    """A registered public file (see `sources.KNOWN_FILES`), from a local copy or its URL."""

    def __init__(self, file: str, path: str | None = None, download_dir: str | None = None):
        if file not in sources.KNOWN_FILES:
            known = ", ".join(sorted(sources.KNOWN_FILES))
            raise UserError(f"unknown data file '{file}'; known files: {known}")
        self.file = sources.KNOWN_FILES[file]
        self.path = path
        self.download_dir = Path(download_dir) if download_dir else None

    def documents(self) -> list[str]:
        return [sources.read_text(sources.locate(self.file, self.path, self.download_dir))]


class TextFiles:
    """Local UTF-8 text files, given as paths or glob patterns; each file is one document."""

    def __init__(self, paths: list[str] | str):
        self.patterns = [paths] if isinstance(paths, str) else list(paths or [])
        if not self.patterns:
            raise UserError("data.source.paths is empty; pass data.source.paths=[file.txt,...]")

    def files(self) -> list[Path]:
        found: list[Path] = []
        for pattern in self.patterns:
            matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
            if not matches:
                raise UserError(
                    f"no file matches '{pattern}' (data.source.paths); check the path or glob"
                )
            found += [Path(m) for m in matches if Path(m).is_file()]
        return found

    def documents(self) -> list[str]:
        return [sources.read_text(path) for path in self.files()]


class HFDataset:
    """One split of a Hugging Face dataset (hub name, or a loader such as 'json' with files)."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        text_column: str = "text",
        data_files: str | list[str] | dict | None = None,
        revision: str | None = None,
    ):
        self.kwargs = dict(
            path=path, name=name, split=split, text_column=text_column,
            data_files=data_files, revision=revision,
        )

    def documents(self) -> list[str]:
        return sources.hf_texts(**self.kwargs)


class TableColumn:
    """One column of TSV/CSV/JSON-lines files as documents, e.g. SST-2's train sentences."""

    def __init__(self, files: list[str], column: str, format: str | None = None,
                 download_dir: str | None = None, unique: bool = True):
        self.files, self.column, self.format = list(files), column, format
        self.download_dir, self.unique = download_dir, unique

    def documents(self) -> list[str]:
        texts: list[str] = []
        for name in self.files:
            path = examples.local_file(name, self.download_dir)
            rows = examples.read_rows(path, self.format)
            if rows and self.column not in rows[0]:
                raise UserError(f"{path} has no column {self.column!r} (columns: "
                                f"{', '.join(rows[0])}); set data.source.column to one of them")
            texts += [row[self.column] for row in rows]
        # dict.fromkeys keeps the first occurrence of each text, in order.
        return list(dict.fromkeys(texts)) if self.unique else texts


class Combined:
    """The documents of several sources, one after the other (e.g. in-domain + general text)."""

    def __init__(self, sources: list):
        if not sources:
            raise UserError("data.source.sources is empty; list at least one document source")
        self.sources = list(sources)

    def documents(self) -> list[str]:
        return [doc for source in self.sources for doc in source.documents()]
