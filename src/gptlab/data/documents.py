"""Where the documents of a corpus come from, read as a stream and recognised without reading.

A document source (the `data.source` of an LM corpus) has

- `fingerprint()`: a string that changes whenever its content may have: sizes, modification
  times and a content sample of local files, the pinned sha256 of registered files, the
  builder config (revision, data files) of a Hugging Face dataset. It reads next to nothing,
  so a prepared corpus is found again without reading the corpus;
- `documents()`: the documents one by one, as `Text` (a row held in memory) or `FilePart`
  (a byte range of a local file, read where it is tokenized: in a worker process), so a
  corpus of any size streams through bounded memory;
- `split_names`: the source's own splits ({"train": ..., "val": ..., "test": ...}), or None;
- `single_document`: True when it holds one document (split contiguously, like nanoGPT);
- `size()`: the bytes of text it holds, when known without reading (for progress bars).
- `special_tokens` (optional): strings that a tokenizer trained on it keeps as single tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptlab.data import examples, sources
from gptlab.errors import UserError

PART_BYTES = 8 << 20  # a larger file is read in parts of about this size, cut between lines
SAMPLE_BYTES = 1 << 16  # a file's fingerprint reads this much at its start, middle and end
_CUT_WINDOW = 1 << 16
_GRAPHIC = range(0x21, 0x7F)  # ASCII characters that no cleaning or pre-tokenizer changes
LM_SPLITS = ("train", "val", "test")


def digest(value: object) -> str:
    """A stable hex digest of a JSON-able value (dict keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Text:
    """A whole document held in memory; `split` is its dataset's own split, if any."""

    text: str
    split: str | None = None
    first = True  # it starts a document ...
    last = True  # ... and ends it

    def read(self) -> str:
        return self.text

    @property
    def nbytes(self) -> int:
        return len(self.text)

    @property
    def key(self) -> str:
        """What places the document in a split (split by document): its content."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class FilePart:
    """Bytes [start, end) of a UTF-8 file of `size` bytes; the whole file is one document.

    Parts end after a newline between two printable ASCII characters, where no cleaning
    option and neither pre-tokenizer (char, byte-level BPE) joins anything across: the
    parts tokenize exactly as the whole file would.
    """

    path: str
    start: int
    end: int
    size: int
    key: str  # the same for every part of a file: its size and content sample
    split = None

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.size

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                data = f.read(self.end - self.start)
        except OSError as exc:
            raise UserError(f"cannot read {self.path} ({exc.strerror}); check the path") from exc
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"file {self.path} is not valid UTF-8 at byte {self.start + exc.start}; "
                "re-encode it as UTF-8"
            ) from None


def file_identity(path: Path) -> dict:
    """A local file as the cache sees it: path, size, modification time, content sample."""
    try:
        stat = path.stat()
        with open(path, "rb") as f:
            sample = b"".join(_read_at(f, offset, SAMPLE_BYTES)
                              for offset in _sample_offsets(stat.st_size))
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); check the path") from exc
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sample": hashlib.sha256(sample).hexdigest()}


def file_parts(path: Path, key: str | None = None) -> Iterator[FilePart]:
    """A file as one document in parts of about PART_BYTES (see FilePart)."""
    identity = file_identity(path)
    key = key or digest([identity["size"], identity["sample"]])
    size, start = identity["size"], 0
    with open(path, "rb") as f:
        while size - start > PART_BYTES:
            end = _cut_after(f, start + PART_BYTES, size)
            if end is None:
                break
            yield FilePart(str(path), start, end, size, key)
            start = end
    yield FilePart(str(path), start, size, size, key)


def _sample_offsets(size: int) -> list[int]:
    if size <= 3 * SAMPLE_BYTES:
        return [0]
    return [0, size // 2, size - SAMPLE_BYTES]


def _read_at(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _cut_after(f, offset: int, size: int) -> int | None:
    """The position after the first safe newline (see FilePart) at or past offset, if any."""
    while offset < size - 1:
        window = _read_at(f, offset - 1, _CUT_WINDOW + 2)
        for i in range(1, len(window) - 1):
            if window[i] == 0x0A and window[i - 1] in _GRAPHIC and window[i + 1] in _GRAPHIC:
                return offset + i
        offset += _CUT_WINDOW
    return None


class KnownFile:
    """A registered public file (see `sources.KNOWN_FILES`), from a local copy or its URL."""

    split_names = None
    single_document = True

    def __init__(self, file: str, path: str | None = None, download_dir: str | None = None):
        if file not in sources.KNOWN_FILES:
            known = ", ".join(sorted(sources.KNOWN_FILES))
            raise UserError(f"unknown data file '{file}'; known files: {known}")
        self.file = sources.KNOWN_FILES[file]
        self.path = path
        self.download_dir = Path(download_dir) if download_dir else None

    def fingerprint(self) -> str:
        if self.path is None:  # every copy but the user's own is checked against this hash
            return digest(["KnownFile", self.file.sha256])
        return digest(["KnownFile", file_identity(self._local())])

    def documents(self) -> Iterator[FilePart]:
        key = None if self.path else self.file.sha256
        return file_parts(self._local(), key)

    def size(self) -> int:
        return self._local().stat().st_size

    def _local(self) -> Path:
        return sources.locate(self.file, self.path, self.download_dir)


class TextFiles:
    """Local UTF-8 text files, given as paths or glob patterns; each file is one document."""

    split_names = None

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

    @property
    def single_document(self) -> bool:
        return len(self.files()) == 1

    def fingerprint(self) -> str:
        return digest(["TextFiles", [file_identity(path) for path in self.files()]])

    def documents(self) -> Iterator[FilePart]:
        for path in self.files():
            yield from file_parts(path)

    def size(self) -> int:
        return sum(os.path.getsize(path) for path in self.files())


class HFDataset:
    """A text column of a Hugging Face dataset (hub name, or a loader such as 'json' with files).

    With `split_names` ({"train": "train", "val": "validation", "test": "test"}) the dataset's
    own splits are used, as published results are; otherwise the rows of `split` are the
    documents and gptlab splits them. `streaming=True` reads the rows without downloading
    and converting the dataset first; `cache_dir` is the datasets library's cache folder.
    """

    single_document = False

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        text_column: str = "text",
        data_files: str | list[str] | dict | None = None,
        revision: str | None = None,
        split_names: dict[str, str] | None = None,
        streaming: bool = False,
        cache_dir: str | None = None,
    ):
        self.path, self.name, self.split, self.text_column = path, name, split, text_column
        self.data_files = _plain(data_files)
        self.revision, self.streaming, self.cache_dir = revision, streaming, cache_dir
        self.split_names = dict(split_names) if split_names else None
        if self.split_names is not None:
            _check_split_names(self.split_names)

    def fingerprint(self) -> str:
        dataset = sources.hf_fingerprint(self.path, self.name, self.data_files, self.revision,
                                         self.cache_dir)
        return digest(["HFDataset", dataset, self.text_column,
                       self.split_names or self.split])

    def documents(self) -> Iterator[Text]:
        splits = self.split_names or {None: self.split}
        for ours, theirs in splits.items():
            for text in sources.hf_stream(self.path, self.name, theirs, self.text_column,
                                          self.data_files, self.revision, self.streaming,
                                          self.cache_dir):
                yield Text(text, ours)

    def size(self) -> None:
        return None


class TableColumn:
    """One column of TSV/CSV/JSON-lines files as documents, e.g. SST-2's train sentences."""

    split_names = None
    single_document = False

    def __init__(self, files: list[str], column: str, format: str | None = None,
                 download_dir: str | None = None, unique: bool = True):
        self.files, self.column, self.format = list(files), column, format
        self.download_dir, self.unique = download_dir, unique

    def fingerprint(self) -> str:
        files = [sources.KNOWN_FILES[name].sha256 if name in sources.KNOWN_FILES
                 else file_identity(examples.local_file(name)) for name in self.files]
        return digest(["TableColumn", files, self.column, self.format, self.unique])

    def documents(self) -> Iterator[Text]:
        texts: list[str] = []
        for name in self.files:
            path = examples.local_file(name, self.download_dir)
            rows = examples.read_rows(path, self.format)
            if rows and self.column not in rows[0]:
                raise UserError(f"{path} has no column {self.column!r} (columns: "
                                f"{', '.join(rows[0])}); set data.source.column to one of them")
            texts += [row[self.column] for row in rows]
        # dict.fromkeys keeps the first occurrence of each text, in order.
        return map(Text, dict.fromkeys(texts) if self.unique else texts)

    def size(self) -> None:
        return None


class Combined:
    """The documents of several sources, one after the other (e.g. in-domain + general text)."""

    split_names = None

    def __init__(self, sources: list):
        if not sources:
            raise UserError("data.source.sources is empty; list at least one document source")
        if any(source.split_names for source in sources):
            raise UserError("a source of data.source.sources has its own splits (split_names); "
                            "combined sources are split by gptlab: drop split_names")
        self.sources = list(sources)

    @property
    def single_document(self) -> bool:
        return len(self.sources) == 1 and self.sources[0].single_document

    def fingerprint(self) -> str:
        return digest(["Combined", [source.fingerprint() for source in self.sources]])

    def documents(self) -> Iterator[Text | FilePart]:
        for source in self.sources:
            yield from source.documents()

    def size(self) -> int | None:
        sizes = [source.size() for source in self.sources]
        return None if None in sizes else sum(sizes)


def _check_split_names(split_names: dict[str, str]) -> None:
    unknown = sorted(set(split_names) - set(LM_SPLITS))
    if unknown or not {"train", "val"} <= set(split_names):
        raise UserError(
            f"data.source.split_names {split_names} must map train and val (and optionally "
            f"test) to the dataset's split names, e.g. {{train: train, val: validation, "
            f"test: test}}"
        )


def _plain(value):
    """A config's data_files (DictConfig, ListConfig) as plain dicts and lists."""
    if isinstance(value, str | None):
        return value
    if hasattr(value, "items"):
        return {key: _plain(item) for key, item in value.items()}
    return [_plain(item) for item in value]
