"""Shared fixtures: the offline data mirror, a scratch workspace, and real training runs."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests read the data sets from a local mirror, never from the network. Made absolute:
# entry points started in another folder (cwd=tmp_path) must find the same mirror.
if "GPTLAB_DATA_MIRROR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["GPTLAB_DATA_MIRROR"] = str(SHARED_DATA)
if os.environ.get("GPTLAB_DATA_MIRROR"):
    os.environ["GPTLAB_DATA_MIRROR"] = str(Path(os.environ["GPTLAB_DATA_MIRROR"]).resolve())
os.environ.setdefault("WANDB_MODE", "offline")
# Under pytest-xdist (make test runs one worker per core), each worker and the entry points
# it starts use one thread: two workers of two threads each on two cores run slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_entry(script: str, *args: str, cwd: Path | None = None, expect_rc: int = 0,
              env: dict | None = None) -> str:
    """Run a top-level entry point in a fresh Python process; return stdout + stderr."""
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd or REPO, capture_output=True,
        text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, f"exit {proc.returncode}:\n{output[-4000:]}"
    return output


def run_folders(output: str) -> list[Path]:
    """Every run folder that train.py reported ("run folder: ..."), in order."""
    return [Path(folder) for folder in re.findall(r"^run folder: (.+)$", output, re.MULTILINE)]


def run_folder(output: str) -> Path:
    """The run folder that train.py reports on its last line of standard output."""
    return run_folders(output)[-1]


def metrics_column(run: Path, name: str) -> list[float]:
    """Every value of `name` in a run's csv/metrics.csv, in order."""
    with open(run / "csv" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (run-*.wandb, a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def start_entry(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The text of Tiny Shakespeare, from the data mirror."""
    path = Path(os.environ.get("GPTLAB_DATA_MIRROR", "")) / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip("set GPTLAB_DATA_MIRROR to the shared data folder")
    return path.read_text(encoding="utf-8")


@dataclass
class Workspace:
    root: Path

    @property
    def args(self) -> list[str]:
        """Overrides that keep runs and caches of a test session in its scratch folder."""
        return [f"paths.root_dir={self.root}", f"paths.cache_dir={self.root / 'cache'}"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="session")
def trained_runs(workspace) -> list[tuple[Path, str]]:
    """Two identical short runs started at the same moment: [(run folder, output), ...]."""
    args = (*workspace.args, "model=nano", "debug=fast", "logger=csv", "hardware=cpu",
            "data.val_windows=4", "final_eval_tokens=null")  # val_full/*: the whole split
    run_entry("train.py", *args, "trainer.max_steps=1")  # prepare the cache once
    procs = [start_entry("train.py", *args) for _ in range(2)]
    runs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        runs.append((run_folder(out), out))
    return runs
