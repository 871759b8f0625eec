"""Local run comparison: table and plots from run folders."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gptlab.reporting.compare import compare, labels, load_run, main
from tests.conftest import metrics_column


def test_table_and_plot_match_the_runs_metrics(trained_runs, tmp_path):
    runs = [run for run, _ in trained_runs]
    rows = compare([str(r) for r in runs], out=tmp_path)
    assert (tmp_path / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "comparison.md").read_text().count("\n") == 2 + len(runs)
    with open(tmp_path / "comparison.csv") as f:
        written = list(csv.DictReader(f))
    for run, row, saved in zip(runs, rows, written, strict=True):
        assert row["run"] == run.name  # identical overrides: runs are named by folder
        assert row["best val/loss"] == min(metrics_column(run, "val/loss"))
        assert row["final val/loss"] == metrics_column(run, "val/loss")[-1]
        assert row["val_full/loss"] == metrics_column(run, "val_full/loss")[-1]
        assert row["tokens"] == metrics_column(run, "train/tokens")[-1]
        assert row["steps"] == 6 and row["params"] > 0
        assert float(saved["best val/loss"]) == pytest.approx(row["best val/loss"])


def fake_run(folder: Path, overrides: list[str]) -> Path:
    (folder / "csv").mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "csv" / "metrics.csv").write_text("step,val/loss,val/tokens\n10,2.5,1000\n")
    return folder


def test_runs_are_named_by_the_overrides_that_differ(tmp_path):
    sweep = [fake_run(tmp_path / str(i), ["model=nano", f"task.optimizer.lr={lr}"])
             for i, lr in enumerate(["1e-3", "3e-3"])]
    assert labels([load_run(r) for r in sweep]) == ["task.optimizer.lr=1e-3",
                                                    "task.optimizer.lr=3e-3"]
    rows = compare([str(tmp_path)], out=tmp_path / "out")  # a sweep folder finds its runs
    assert [r["best val/loss"] for r in rows] == [2.5, 2.5] and rows[0]["params"] is None


def test_a_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no run folder") and str(tmp_path) in error
