"""Mistakes a user can make: one clear line, a non-zero exit, and nothing earlier damaged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import run_entry


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(script: str, *args: str, env: dict | None = None, rc: int = 2) -> str:
    """Run an entry point that must fail; return its one-line error."""
    out = run_entry(script, *args, expect_rc=rc, env=env)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert "Traceback" not in out
    return errors[0]


@pytest.fixture(scope="module")
def untouched(trained_runs, workspace):
    """Every file of the earlier run and of the corpus cache comes out of the failures unchanged.

    (A failure may add a cache folder: a corpus can be prepared before a check rejects it.)
    """
    run, _ = trained_runs[0]
    before = fingerprint(run) | fingerprint(workspace.root / "cache")
    yield
    after = fingerprint(run) | fingerprint(workspace.root / "cache")
    assert {name: after.get(name) for name in before} == before


def train_fails(workspace, *args: str, env: dict | None = None) -> str:
    return fails("train.py", *workspace.args, "model=nano", "debug=fast", "logger=csv",
                 *args, env=env)


def text_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return f"data.source.paths=[{path}]"


def test_missing_data_file(workspace, untouched):
    line = train_fails(workspace, "data.source.path=/no/such/input.txt")
    assert "/no/such/input.txt" in line


# A prepared corpus is found by its pinned sha256 without reading the file: these two use
# an empty cache, so that the file is looked for.
def test_offline_without_a_local_copy(workspace, untouched, tmp_path):
    line = train_fails(workspace, f"data.source.download_dir={tmp_path}",
                       f"data.cache_dir={tmp_path / 'cache'}",
                       env={"GPTLAB_DATA_MIRROR": str(tmp_path), "GPTLAB_OFFLINE": "1"})
    assert "input.txt" in line and "GPTLAB_DATA_MIRROR" in line


def test_checksum_mismatch_in_the_mirror(workspace, untouched, tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("not Shakespeare\n" * 1000)
    line = train_fails(workspace, f"data.cache_dir={tmp_path / 'cache'}",
                       env={"GPTLAB_DATA_MIRROR": str(tmp_path)})
    assert "sha256" in line


def test_empty_corpus(workspace, untouched, tmp_path):
    line = train_fails(workspace, "data=text_files", text_file(tmp_path, b""))
    assert "empty" in line


def test_corpus_shorter_than_the_context(workspace, untouched, tmp_path):
    line = train_fails(workspace, "data=text_files", "data.tokenizer=char",
                       text_file(tmp_path, b"To be, or not to be.\n" * 3))
    assert "block_size" in line


def test_invalid_utf8(workspace, untouched, tmp_path):
    line = train_fails(workspace, "data=text_files", text_file(tmp_path, b"ok\xff\xfe bad"))
    assert "UTF-8" in line and "corpus.txt" in line


def test_unknown_config_option(workspace, untouched):
    out = run_entry("train.py", *workspace.args, "model=gpt5", expect_rc=1)
    assert "Could not find 'model/gpt5'" in out and "Traceback" not in out


def test_run_folder_without_a_checkpoint(untouched, tmp_path):
    line = fails("evaluate.py", f"run={tmp_path}")
    assert str(tmp_path) in line and "checkpoint" in line


def test_corrupt_checkpoint(untouched, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x00garbage" * 100)
    line = fails("generate.py", f"ckpt={bad}")
    assert "corrupt" in line and str(bad) in line


def test_init_from_and_a_shared_pretraining_together(workspace, untouched):
    """A sweep (this experiment is one): the job fails, and the sweep says which and why."""
    out = run_entry("train.py", "experiment=gpt1_ablation", "ablation=full", "seed=1",
                    *workspace.args, "debug=fast", "logger=csv", "task.init_from=/some/run",
                    expect_rc=1)
    errors = {line for line in out.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1 and "Traceback" not in out
    (line,) = errors
    assert "task.init_from=/some/run" in line and "pretrain_once=null" in line
    assert "Error executing job with overrides: ['ablation=full', 'seed=1'" in out


def test_a_batch_of_no_windows(workspace, untouched):
    assert "data.batch_size=0 must be at least 1" in train_fails(workspace, "data.batch_size=0")
