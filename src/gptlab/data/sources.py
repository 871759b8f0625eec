"""Finding data files: a user's path, an offline mirror folder, an earlier download, or the web.

Every known file has a pinned sha256, so a copy from any of these places is the same bytes.
A mirror folder (env var GPTLAB_DATA_MIRROR) is laid out by `RemoteFile.relpath`, like
shared/data; it lets tests, CI and offline machines use the real code path without a network.

Archives: for a ".gz" URL the download is gunzipped; for a ".zip" URL `member` is extracted.
In both cases the sha256 is that of the extracted file, which is what the mirror holds.

Some files also ship inside a PyPI package (`RemoteFile.package_asset`, e.g. GPT-2's merge
ranks in openai-whisper); an installed copy with the pinned sha256 is used like a mirror's.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gptlab.errors import UserError

MIRROR_ENV = "GPTLAB_DATA_MIRROR"
OFFLINE_ENV = "GPTLAB_OFFLINE"  # set to 1 to never download (e.g. on compute nodes)
DEFAULT_DOWNLOAD_DIR = Path.home() / ".cache" / "gptlab" / "data"
TIMEOUT_S = 30
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A public file pinned by content; `member` names the file inside a .zip download.

    `package_asset` is (package, path inside it) of a copy that a PyPI package ships.
    """

    relpath: str
    url: str
    sha256: str
    member: str | None = None
    package_asset: tuple[str, str] | None = None


TINY_SHAKESPEARE = RemoteFile(
    "tinyshakespeare/input.txt",
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)

# The hashes are those of the shared/data copies, whose rows match GLUE's SST-2 counts; they
# have not been byte-compared with the zip's members, so a download that differs stops with a
# checksum error (never silently different data). A copy can always be given as a path.
_SST2_ZIP = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
SST2_TRAIN = RemoteFile(
    "sst2/train.tsv",
    _SST2_ZIP,
    "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    member="SST-2/train.tsv",
)
SST2_DEV = RemoteFile(
    "sst2/dev.tsv",
    _SST2_ZIP,
    "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    member="SST-2/dev.tsv",
)
SST2_TEST = RemoteFile(
    "sst2/test.tsv",
    _SST2_ZIP,
    "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13",
    member="SST-2/test.tsv",
)

_MULTI30K_SHA256 = {
    ("train", "en"): "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    ("train", "de"): "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    ("train", "fr"): "5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d",
    ("val", "en"): "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    ("val", "de"): "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    ("val", "fr"): "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc",
    ("test_2016_flickr", "en"): "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
    ("test_2016_flickr", "de"): "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    ("test_2016_flickr", "fr"): "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6",
}
MULTI30K: dict[tuple[str, str], RemoteFile] = {
    (split, lang): RemoteFile(
        f"multi30k/{split}.{lang}",
        f"https://github.com/multi30k/dataset/raw/master/data/task1/raw/{split}.{lang}.gz",
        sha256,
    )
    for (split, lang), sha256 in _MULTI30K_SHA256.items()
}

# GPT-2's byte-level BPE as tiktoken's merge-ranks file (tiktoken's r50k_base, the same ranks as
# its "gpt2" encoding); the sha256 is the one tiktoken itself expects. openai-whisper ships the
# identical file as whisper/assets/gpt2.tiktoken.
GPT2_RANKS = RemoteFile(
    "gpt2/r50k_base.tiktoken",
    "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    package_asset=("whisper", "assets/gpt2.tiktoken"),
)

# Taskmaster-4 (TM-4-2024): coffee-ordering conversations and reward examples, JSON files of the
# repository pinned at a commit (the sha256s are those of that commit's files).
_TASKMASTER4_URL = ("https://raw.githubusercontent.com/google-research-datasets/Taskmaster/"
                    "d92cb6af3005f1dc09c39e75e7daf4a04905e00b/TM-4-2024")
_TASKMASTER4_SHA256 = {
    "data/data_00.json": "d9440d1a46e6ba9f8c680a77a7dc7a42b0b3266ef555aeac6160b0d5ac37c647",
    "data/data_01.json": "2577d6af1c9d7cc5540d5193206d35b000ebeff59925c1076ce724f1a85b8964",
    "data/data_02.json": "b353618d9709c6bdeafa08682526e04047ad28d5f9acd65ed7878482a90d49df",
    "data/data_03.json": "45fe8eb52af674b69972d172c911f9cfd6f5044b61338b524997edf1a4861641",
    "data/data_04.json": "bf5f2e3704aab48f657ec97f8d9bf041abec17a1cd3e56206c3424910875088d",
    "data/data_05.json": "3d158e9880bfea3e5db18d008cf1f726f1d802eca28c2b71fc291274b9ee60ba",
    "data/data_06.json": "dd0546a6aaf430a812f4cfb5d8f9f0c823136ba2e77e78103b50a8e95080759c",
    "data/data_07.json": "b61f11f3c950c330049906ae249e858503ec7c905fcad5b4a7edd851ccf07bbc",
    "reward/reward_00.json": "79f809857b90e8afe28c542dbcbdea79a1a1e365aa4626b6ec2fdc37785a9f24",
    "reward/reward_01.json": "818fe4604d23cbb3b77aebf98f28300ae411ca3305a4b730d19bd8ff69ab9455",
    "reward/reward_02.json": "433851379c7143299b2570ffc7c40a8f57ddabf0c8278ad123da7a7dac64c867",
    "reward/reward_03.json": "d2f96717912652d3bd0a7aa907aa0b798aa35465e5ee5a768f0de118d08fe149",
    "reward/reward_04.json": "73ae7f65dc98f1906eac243cf95cc75f7b6489ef5e4a7cf8c787f4704672a7df",
    "reward/reward_05.json": "8d0c124fd06b261596fc72e188fbd326d1b5dd559ecbf3a585a513c1f3e12cf1",
    "reward/reward_06.json": "55ce13a025dcfb842ef2de75e4cfafb07a1f1938905d5c4e59e5b440a7ce624c",
}
TASKMASTER4 = [RemoteFile(f"taskmaster4/{path}", f"{_TASKMASTER4_URL}/{path}", sha256)
               for path, sha256 in _TASKMASTER4_SHA256.items()]

# Every registered file by its relpath, e.g. "tinyshakespeare/input.txt" or "multi30k/train.de".
KNOWN_FILES: dict[str, RemoteFile] = {
    f.relpath: f for f in (TINY_SHAKESPEARE, SST2_TRAIN, SST2_DEV, SST2_TEST, *MULTI30K.values(),
                            *TASKMASTER4)
}


@dataclass(frozen=True)
class RemoteFolder:
    """A folder of many files inside a .zip archive, such as a folder of a repository snapshot.

    It is pinned by `folder_digest` of its files, not by the archive's bytes, which hosts such
    as GitHub do not promise to keep stable; `member` is the folder's path inside the archive.
    A mirror holds the folder at `relpath`.
    """

    relpath: str
    url: str
    digest: str
    member: str


def folder_digest(folder: Path) -> str:
    """sha256 over `sha256sum`-style lines ("<sha256>  <path>") of every file, sorted by path."""
    lines = sorted(f"{sha256_of(p)}  {p.relative_to(folder).as_posix()}\n"
                   for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def locate_folder(folder: RemoteFolder, download_dir: Path | None = None) -> Path:
    """A local copy of the folder: the mirror's, an earlier download, or a new download."""
    mirror = _mirror()
    if mirror and (mirror / folder.relpath).is_dir():
        candidate = mirror / folder.relpath
        actual = folder_digest(candidate)
        if actual != folder.digest:
            raise UserError(
                f"mirror copy {candidate} has digest {actual}, expected {folder.digest}; "
                f"replace it with {folder.member} of {folder.url} or unset {MIRROR_ENV}"
            )
        return candidate
    target = Path(download_dir or DEFAULT_DOWNLOAD_DIR) / folder.relpath
    if target.is_dir() and folder_digest(target) == folder.digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        raw, extracted = Path(tmp) / "raw.zip", Path(tmp) / "extracted"
        _fetch(folder, raw)
        _extract_folder(folder, raw, extracted)
        actual = folder_digest(extracted)
        if actual != folder.digest:
            raise UserError(
                f"download of {folder.relpath} from {folder.url} has digest {actual}, expected "
                f"{folder.digest}; retry, or set {MIRROR_ENV} to a folder with {folder.relpath}"
            )
        if target.exists():
            shutil.rmtree(target)  # a damaged earlier download
        os.replace(extracted, target)
    return target


def _extract_folder(folder: RemoteFolder, raw: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(raw) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.is_dir() or not name.startswith(folder.member):
                    continue
                relative = Path(name[len(folder.member):])
                if relative.is_absolute() or ".." in relative.parts:
                    continue  # never write outside dest
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src:
                    _copy(src, dest / relative)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UserError(
            f"download of {folder.relpath} from {folder.url} is not a readable archive "
            f"({_reason(exc)}); retry, or set {MIRROR_ENV} to a folder with {folder.relpath}"
        ) from exc


def locate(
    file: RemoteFile, path: str | Path | None = None, download_dir: Path | None = None
) -> Path:
    """Return a local copy: the user's path, else the mirror, a package's copy, an earlier
    download, a new one.

    A user's own path is trusted as is (it may be a deliberately different version); every
    other copy must match the pinned sha256.
    """
    if path is not None:
        return _user_path(Path(path), file)
    mirrored = _mirror_copy(file)
    if mirrored is not None:
        return mirrored
    shipped = _package_copy(file)
    if shipped is not None:
        return shipped
    target = Path(download_dir or DEFAULT_DOWNLOAD_DIR) / file.relpath
    if target.is_file() and sha256_of(target) == file.sha256:
        return target
    _download(file, target)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_text(path: Path) -> str:
    """Read a file as strict UTF-8, so that a wrongly encoded file fails here, not in training."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); check the path") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"file {path} is not valid UTF-8 at byte {exc.start}; re-encode it as UTF-8"
        ) from None


def hf_stream(
    path: str,
    name: str | None,
    split: str,
    text_column: str,
    data_files: str | list[str] | dict | None = None,
    revision: str | None = None,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> Iterator[str]:
    """The texts of one column of a HF dataset split, one by one, a batch of rows at a time.

    With streaming=True nothing is downloaded or converted first (hub datasets of any size).
    """
    ds = _load_hf(path, name, split, data_files, revision, cache_dir, streaming=streaming)
    if ds.column_names is not None:  # a stream may not know its columns before its first row
        _check_columns(ds.column_names, [text_column], _where(path, name, split))
    for batch in ds.iter(batch_size=1000):
        _check_columns(list(batch), [text_column], _where(path, name, split))
        yield from ("" if text is None else str(text) for text in batch[text_column])


def hf_fingerprint(
    path: str,
    name: str | None,
    data_files: str | list[str] | dict | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> str:
    """What identifies a HF dataset's content without reading it: its builder's config id
    (which covers the data files, their revision or, for local files, their modification)
    and its code's hash."""
    import datasets  # slow to import; only the HF path needs it

    try:
        builder = datasets.load_dataset_builder(
            path, name, data_files=data_files, revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:
        raise _hf_error(exc, _where(path, name, None)) from exc
    return f"{builder.name}/{builder.config_id}/{builder.hash}"


def hf_columns(
    path: str,
    name: str | None,
    split: str,
    columns: list[str],
    data_files: str | list[str] | dict | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, list]:
    """Some columns of one split of a HF dataset, each as a list."""
    ds = _load_hf(path, name, split, data_files, revision, cache_dir)
    _check_columns(ds.column_names, columns, _where(path, name, split))
    return {column: list(ds[column]) for column in columns}


def _load_hf(path: str, name: str | None, split: str, data_files, revision, cache_dir,
             streaming: bool = False):
    import datasets  # slow to import; only the HF path needs it

    try:
        return datasets.load_dataset(path, name, split=split, data_files=data_files,
                                     revision=revision, streaming=streaming,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:
        raise _hf_error(exc, _where(path, name, split)) from exc


def _where(path: str, name: str | None, split: str | None) -> str:
    return (f"dataset {path!r}" + (f" (config {name!r})" if name else "")
            + (f" split {split!r}" if split else ""))


def _hf_error(exc: Exception, where: str) -> UserError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"cannot load {where}: {reason}; check the name, config, split and network "
        "(or HF_DATASETS_OFFLINE with a filled cache)"
    )


def _check_columns(available: list[str], wanted: list[str], where: str) -> None:
    for column in wanted:
        if column not in available:
            raise UserError(
                f"{where} has no column {column!r}; available columns: "
                f"{', '.join(available)}; choose one of them"
            )


def _user_path(path: Path, file: RemoteFile) -> Path:
    if not path.is_file():
        raise UserError(
            f"data file {path} (given for {file.relpath}) does not exist; fix the path, "
            f"or leave it unset to use {MIRROR_ENV} or a download"
        )
    return path


def _mirror() -> Path | None:
    """The mirror folder, if set; a relative path is read from the current folder."""
    mirror = os.environ.get(MIRROR_ENV)
    return Path(mirror) if mirror else None


def _mirror_copy(file: RemoteFile) -> Path | None:
    mirror = _mirror()
    if not mirror:
        return None
    candidate = mirror / file.relpath
    if not candidate.is_file():
        return None
    actual = sha256_of(candidate)
    if actual != file.sha256:
        raise UserError(
            f"mirror copy {candidate} has sha256 {actual}, expected {file.sha256}; "
            f"replace it with the file from {file.url} or unset {MIRROR_ENV}"
        )
    return candidate


def _package_copy(file: RemoteFile) -> Path | None:
    """The copy an installed package ships, if it has the pinned content (never imported)."""
    if file.package_asset is None:
        return None
    package, relpath = file.package_asset
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relpath
        if candidate.is_file() and sha256_of(candidate) == file.sha256:
            return candidate
    return None


def _download(file: RemoteFile, target: Path) -> None:
    """Fetch into temp files next to target and move into place only once the hash matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        raw = Path(tmp) / "raw"
        _fetch(file, raw)
        extracted = Path(tmp) / "extracted"
        _extract(file, raw, extracted)
        actual = sha256_of(extracted)
        if actual != file.sha256:
            raise UserError(
                f"download of {file.relpath} from {file.url} has sha256 {actual}, expected "
                f"{file.sha256}; the file changed upstream or was corrupted: retry, or set "
                f"{MIRROR_ENV} to a folder with a good copy of {file.relpath}"
            )
        os.replace(extracted, target)


def _mirror_hint(relpath: str) -> str:
    """How to point the mirror at the file, saying where a mirror that is set was looked in
    (a relative one resolves from the current folder, which need not be the repository)."""
    mirror = _mirror()
    if not mirror:
        return f"set {MIRROR_ENV} to a folder that holds {relpath}"
    return (f"{MIRROR_ENV}={mirror} (here {mirror.resolve()}) holds no {relpath}: "
            f"point it at a folder that does")


def _fetch(file: RemoteFile | RemoteFolder, dest: Path) -> None:
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise UserError(
            f"{file.relpath} is not available offline ({OFFLINE_ENV} is set, so {file.url} "
            f"is not downloaded); {_mirror_hint(file.relpath)}, or pass the file's path"
        )
    try:
        with urllib.request.urlopen(file.url, timeout=TIMEOUT_S) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"download {file.relpath}",
                disable=total is not None and total < 4 * _CHUNK,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as exc:
        raise UserError(
            f"cannot download {file.relpath} from {file.url} ({_reason(exc)}); without a "
            f"network, {_mirror_hint(file.relpath)}, or pass the file's path"
        ) from exc


def _extract(file: RemoteFile, raw: Path, dest: Path) -> None:
    try:
        if file.member is not None:
            with zipfile.ZipFile(raw) as archive, archive.open(file.member) as src:
                _copy(src, dest)
        elif file.url.endswith(".gz"):
            with gzip.open(raw, "rb") as src:
                _copy(src, dest)
        else:
            os.replace(raw, dest)
    except (gzip.BadGzipFile, zlib.error, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"download of {file.relpath} from {file.url} is not a readable archive "
            f"({_reason(exc)}); retry, or set {MIRROR_ENV} to a folder with {file.relpath}"
        ) from exc


def _copy(src, dest: Path) -> None:
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return str(reason).splitlines()[0]
