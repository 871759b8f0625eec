"""Where labeled examples come from: (text, label) rows and (source, target) pairs per split.

Like `documents.py` for corpora, a source is a small object configured as `data.source`.
A file is named either by a registered public file (`sources.KNOWN_FILES`, e.g.
"sst2/train.tsv": read from the mirror or downloaded and checked) or by a local path.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gptlab.data import sources
from gptlab.errors import UserError

FORMATS = ("tsv", "csv", "jsonl")


def local_file(name: str, download_dir: str | None = None) -> Path:
    """A registered file (mirror, earlier download or a new one), else a local path."""
    if name in sources.KNOWN_FILES:
        return sources.locate(sources.KNOWN_FILES[name], None,
                              Path(download_dir) if download_dir else None)
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; fix the path in data.source.files")
    return path


def _file_format(path: Path, format: str | None) -> str:
    format = format or {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(
        path.suffix.lower(), "")
    if format not in FORMATS:
        raise UserError(f"cannot tell the format of {path}; set data.source.format to one of "
                        f"{', '.join(FORMATS)}")
    return format


def read_rows(path: Path, format: str | None = None,
              columns: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a TSV/CSV file with a header line, or of a JSON-lines file, as str dicts.

    The whole file goes through the CSV reader, so quoted fields may hold newlines (and a
    U+2028 inside a text is just a character). A row with another number of fields than the
    header, or without one of `columns` (or with null there), is an error naming the line:
    a stray tab would otherwise shift the label column.
    """
    format = _file_format(path, format)
    text = sources.read_text(path)
    numbered = _json_rows(path, text) if format == "jsonl" else _table_rows(path, text, format)
    for number, row in numbered:
        for column in columns:
            if column not in row:
                raise UserError(f"{path} has no column {column!r} (line {number} has: "
                                f"{', '.join(row)}); set data.source's *column option to one "
                                f"of them (e.g. data.source.text_column)")
            if row[column] is None:
                raise UserError(f"{path} line {number}: {column!r} is null; give every row a "
                                f"value there")
    return [row for _, row in numbered]


def _json_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # JSON strings never hold a raw \n
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}); fix "
                            f"the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object; write one "
                            f"object per line")
        rows.append((number, {key: None if value is None else str(value)
                              for key, value in row.items()}))
    return rows


def _table_rows(path: Path, text: str, format: str) -> list[tuple[int, dict]]:
    # SST-2's TSV has quotes inside sentences and no quoting: read TSV fields literally.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if format == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if format == "tsv" else csv.QUOTE_MINIMAL)
    header, rows = None, []
    for fields in reader:
        if not fields:
            continue  # a blank line
        if header is None:
            header = fields
            continue
        if len(fields) != len(header):
            raise UserError(
                f"{path} line {reader.line_num} has {len(fields)} fields but the header has "
                f"{len(header)} ({', '.join(header)}); fix the row (in a CSV file, quote a "
                f"field that holds the delimiter)"
            )
        rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    return rows


class LabeledFiles:
    """(text, label) examples from one file per split: TSV, CSV (with a header) or JSON lines."""

    def __init__(self, files: dict[str, str], text_column: str = "text",
                 label_column: str = "label", format: str | None = None,
                 download_dir: str | None = None):
        if "train" not in files:
            raise UserError("data.source.files needs a 'train' file (and usually 'val')")
        self.files, self.format, self.download_dir = dict(files), format, download_dir
        self.text_column, self.label_column = text_column, label_column

    @property
    def splits(self) -> list[str]:
        return list(self.files)

    def examples(self, split: str) -> list[tuple[str, str]]:
        path = local_file(self.files[split], self.download_dir)
        rows = read_rows(path, self.format, (self.text_column, self.label_column))
        if not rows:
            raise UserError(f"labeled file {path} ({split} split) has no examples; give a "
                            f"file with a header line and at least one row")
        return [(row[self.text_column], row[self.label_column].strip()) for row in rows]


class HFLabeled:
    """(text, label) examples from a Hugging Face dataset, e.g. stanfordnlp/sst2."""

    def __init__(self, path: str, splits: dict[str, str], text_column: str = "text",
                 label_column: str = "label", name: str | None = None,
                 data_files: str | list[str] | dict | None = None, revision: str | None = None):
        self.path, self.name, self.split_names = path, name, dict(splits)
        self.text_column, self.label_column = text_column, label_column
        self.data_files, self.revision = data_files, revision

    @property
    def splits(self) -> list[str]:
        return list(self.split_names)

    def examples(self, split: str) -> list[tuple[str, str]]:
        columns = sources.hf_columns(
            self.path, self.name, self.split_names[split], [self.text_column, self.label_column],
            data_files=self.data_files, revision=self.revision,
        )
        return [(str(text), str(label)) for text, label in
                zip(columns[self.text_column], columns[self.label_column], strict=True)]


class ParallelFiles:
    """(source, target) sentence pairs: per split a source file and a target file, line by line."""

    def __init__(self, files: dict[str, list[str]], download_dir: str | None = None):
        if "train" not in files:
            raise UserError("data.source.files needs a 'train' pair of files (and usually 'val')")
        self.files, self.download_dir = {k: list(v) for k, v in files.items()}, download_dir

    @property
    def splits(self) -> list[str]:
        return list(self.files)

    def examples(self, split: str) -> list[tuple[str, str]]:
        if len(self.files[split]) != 2:
            raise UserError(f"data.source.files.{split} must be [source file, target file]")
        paths = [local_file(name, self.download_dir) for name in self.files[split]]
        source, target = (sources.read_text(p).splitlines() for p in paths)
        if len(source) != len(target):
            raise UserError(f"{paths[0]} has {len(source)} lines but {paths[1]} has "
                            f"{len(target)}; parallel files need one sentence per line each")
        if not source:
            raise UserError(f"{paths[0]} ({split} split) is empty; give sentence pairs")
        return list(zip(source, target, strict=True))


class Multi30k(ParallelFiles):
    """Multi30k task 1 captions in any direction between English, German and French."""

    LANGUAGES = ("en", "de", "fr")
    SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}

    def __init__(self, source_lang: str = "en", target_lang: str = "de",
                 download_dir: str | None = None):
        if {source_lang, target_lang} - set(self.LANGUAGES) or source_lang == target_lang:
            raise UserError(f"Multi30k translates between two of {', '.join(self.LANGUAGES)}; "
                            f"got {source_lang} -> {target_lang}")
        files = {split: [f"multi30k/{name}.{source_lang}", f"multi30k/{name}.{target_lang}"]
                 for split, name in self.SPLITS.items()}
        super().__init__(files, download_dir)
