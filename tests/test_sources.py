"""Finding data files: user path, mirror, earlier download, real HTTP download; text decoding."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import re
import socket
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from gptlab.data import sources
from gptlab.data.sources import RemoteFile, hf_fingerprint, hf_stream, locate, read_text
from gptlab.errors import UserError

PAYLOAD = b"To be, or not to be: that is the question.\n" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def mirror() -> Path:
    path = Path(os.environ.get(sources.MIRROR_ENV, ""))
    if not (path / sources.TINY_SHAKESPEARE.relpath).is_file():
        pytest.skip(f"set {sources.MIRROR_ENV} to the shared data folder")
    return path


@pytest.fixture
def no_mirror(monkeypatch):
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL, hits)."""
    www = tmp_path / "www"
    www.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=www))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


def test_every_known_file_matches_its_mirror_copy(mirror):
    for relpath, file in sources.KNOWN_FILES.items():
        assert relpath == file.relpath
        assert sources.sha256_of(mirror / relpath) == file.sha256, relpath


def test_mirror_copy_is_used_without_download(mirror, tmp_path):
    found = locate(sources.TINY_SHAKESPEARE, download_dir=tmp_path)
    assert found == mirror / "tinyshakespeare" / "input.txt"
    assert list(tmp_path.iterdir()) == []


def test_mirror_copy_with_wrong_hash_is_a_user_error(mirror, tmp_path):
    wrong = RemoteFile(sources.TINY_SHAKESPEARE.relpath, closed_port_url(), "0" * 64)
    with pytest.raises(UserError) as info:
        locate(wrong, download_dir=tmp_path)
    message = str(info.value)
    assert "input.txt" in message and "0" * 64 in message
    assert sources.TINY_SHAKESPEARE.sha256 in message and "\n" not in message


def test_explicit_path_wins_and_is_not_checksummed(mirror, tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("my own edition\n")
    assert locate(sources.TINY_SHAKESPEARE, path=str(own)) == own
    with pytest.raises(UserError, match="missing.txt.*does not exist"):
        locate(sources.TINY_SHAKESPEARE, path=tmp_path / "missing.txt")


def test_download_puts_a_verified_file_in_place_once(no_mirror, server, tmp_path):
    www, base, hits = server
    (www / "input.txt").write_bytes(PAYLOAD)
    file = RemoteFile("plays/input.txt", f"{base}/input.txt", sha(PAYLOAD))
    downloads = tmp_path / "downloads"
    target = locate(file, download_dir=downloads)
    assert target == downloads / "plays" / "input.txt"
    assert target.read_bytes() == PAYLOAD
    assert list(target.parent.iterdir()) == [target]  # no temp files left
    assert locate(file, download_dir=downloads) == target
    assert hits == ["/input.txt"]  # the second call reused the earlier download


def test_download_unpacks_gzip_and_zip_members(no_mirror, server, tmp_path):
    www, base, _ = server
    (www / "train.en.gz").write_bytes(gzip.compress(PAYLOAD))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("SST-2/dev.tsv", PAYLOAD)
        archive.writestr("SST-2/train.tsv", b"other")
    (www / "SST-2.zip").write_bytes(buffer.getvalue())
    gz = RemoteFile("m/train.en", f"{base}/train.en.gz", sha(PAYLOAD))
    member = RemoteFile("s/dev.tsv", f"{base}/SST-2.zip", sha(PAYLOAD), member="SST-2/dev.tsv")
    assert locate(gz, download_dir=tmp_path).read_bytes() == PAYLOAD
    assert locate(member, download_dir=tmp_path).read_bytes() == PAYLOAD


def test_bad_download_leaves_nothing_and_keeps_the_earlier_file(no_mirror, server, tmp_path):
    www, base, _ = server
    (www / "input.txt").write_bytes(PAYLOAD + b"tampered")
    file = RemoteFile("plays/input.txt", f"{base}/input.txt", sha(PAYLOAD))
    with pytest.raises(UserError, match=f"expected {sha(PAYLOAD)}"):
        locate(file, download_dir=tmp_path / "fresh")
    assert list((tmp_path / "fresh" / "plays").iterdir()) == []

    earlier = tmp_path / "kept" / "plays" / "input.txt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an older edition")
    with pytest.raises(UserError, match="sha256"):
        locate(file, download_dir=tmp_path / "kept")
    assert earlier.read_bytes() == b"an older edition"
    assert list(earlier.parent.iterdir()) == [earlier]


@pytest.mark.parametrize("reachable", [False, True], ids=["offline", "http-404"])
def test_unreachable_url_without_copy_says_how_to_provide_one(
    no_mirror, server, tmp_path, reachable
):
    url = f"{server[1]}/absent.txt" if reachable else closed_port_url()
    file = RemoteFile("plays/input.txt", url, sha(PAYLOAD))
    with pytest.raises(UserError) as info:
        locate(file, download_dir=tmp_path)
    message = str(info.value)
    assert url in message and sources.MIRROR_ENV in message and "plays/input.txt" in message
    assert "\n" not in message
    assert list((tmp_path / "plays").iterdir()) == []


def test_read_text_is_strict_utf8(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("naïve 你好\n", encoding="utf-8")
    assert read_text(good) == "naïve 你好\n"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok café".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt is not valid UTF-8 at byte 6; re-encode"):
        read_text(bad)
    with pytest.raises(UserError, match="cannot read"):
        read_text(tmp_path / "missing.txt")


def test_hf_stream_reads_a_column_and_names_the_available_ones(tmp_path):
    rows = [{"text": "first doc", "label": 0}, {"text": None, "label": 1}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def load(column: str, streaming: bool = False, files: str = str(data)) -> list[str]:
        return list(hf_stream("json", None, "train", column, data_files=files,
                              streaming=streaming, cache_dir=tmp_path / "hf"))

    assert load("text") == load("text", streaming=True) == ["first doc", ""]
    for streaming in (False, True):
        with pytest.raises(UserError, match="no column 'body'; available columns: text, label"):
            load("body", streaming)
    with pytest.raises(UserError, match="cannot load dataset 'json'"):
        load("text", files=str(tmp_path / "absent.jsonl"))


def test_hf_fingerprint_changes_with_the_local_files_and_reads_no_rows(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "a"}\n')
    before = hf_fingerprint("json", None, str(data), cache_dir=tmp_path / "hf")
    assert hf_fingerprint("json", None, str(data), cache_dir=tmp_path / "hf") == before
    assert not (tmp_path / "hf").exists() or not list((tmp_path / "hf").rglob("*.arrow"))
    data.write_text('{"text": "b"}\n')
    assert hf_fingerprint("json", None, str(data), cache_dir=tmp_path / "hf") != before


def test_a_package_that_ships_the_file_serves_it_when_its_hash_matches(no_mirror, tmp_path,
                                                                       monkeypatch):
    package = tmp_path / "site" / "shipper"
    (package / "assets").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "assets" / "ranks.txt").write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    file = RemoteFile("x/ranks.txt", closed_port_url(), sha(PAYLOAD),
                      package_asset=("shipper", "assets/ranks.txt"))
    assert locate(file, download_dir=tmp_path / "dl") == package / "assets" / "ranks.txt"
    other = RemoteFile("x/ranks.txt", closed_port_url(), sha(b"other"),
                       package_asset=("shipper", "assets/ranks.txt"))
    with pytest.raises(UserError, match="cannot download"):  # a copy of other bytes is no copy
        locate(other, download_dir=tmp_path / "dl")


def test_a_relative_mirror_without_the_file_is_named_where_it_was_looked_in(tmp_path,
                                                                           monkeypatch):
    """A mirror set relative to another folder: the error says where it pointed from here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sources.MIRROR_ENV, "../shared/data")
    file = RemoteFile("x/input.txt", closed_port_url(), sha(PAYLOAD))
    here = tmp_path.resolve().parent / "shared" / "data"
    expected = re.escape(f"GPTLAB_DATA_MIRROR=../shared/data (here {here}) ")
    with pytest.raises(UserError, match=expected + "holds no x/input.txt"):
        locate(file, download_dir=tmp_path / "dl")
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(UserError, match="not available offline.*" + expected):
        locate(file, download_dir=tmp_path / "dl")
