"""Local run comparison: table and plots from run folders."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from gptlab.reporting.compare import compare, fit_power_law, labels, load_run, main
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


def test_power_law_fit_recovers_known_parameters():
    sizes = [1e4, 3e4, 1e5, 3e5, 1e6, 3e6]
    losses = [40.0 * n ** -0.3 + 1.2 for n in sizes]
    a, alpha, c = fit_power_law(sizes, losses)
    assert alpha == pytest.approx(0.3, rel=0.02) and c == pytest.approx(1.2, abs=0.01)
    assert a == pytest.approx(40.0, rel=0.1)


def fake_classify_run(folder: Path, overrides: list[str], accuracy: float) -> Path:
    fake_run(folder, overrides)
    (folder / ".hydra" / "config.yaml").write_text(
        "optimized_metric: val/acc\noptimized_mode: max\nreference:\n  val/acc: 0.9\n")
    (folder / "csv" / "metrics.csv").write_text(
        f"step,val/acc,val_last/acc\n9,{accuracy - 0.1},\n19,{accuracy},\n20,,{accuracy}\n")
    return folder


def test_seeds_of_one_setting_are_averaged_and_plotted_against_a_key(tmp_path):
    accuracy = {("1", "1"): 0.8, ("1", "2"): 0.7, ("2", "1"): 0.6, ("2", "2"): 0.6}
    for i, ((layers, seed), acc) in enumerate(accuracy.items()):
        fake_classify_run(tmp_path / str(i), [f"task.transfer_layers={layers}", f"seed={seed}"],
                          acc)
    rows = compare([str(tmp_path)], out=tmp_path, versus="task.transfer_layers")
    assert [row["best val/acc"] for row in rows] == list(accuracy.values())
    assert [row["reference"] for row in rows] == [0.9] * 4
    with open(tmp_path / "comparison_by_setting.csv") as f:
        settings = list(csv.DictReader(f))
    assert [s["setting"] for s in settings] == ["task.transfer_layers=1",
                                                "task.transfer_layers=2"]
    assert float(settings[0]["val_last/acc mean"]) == pytest.approx(0.75)
    assert float(settings[0]["val_last/acc std"]) == pytest.approx(0.0707, abs=1e-4)
    assert float(settings[1]["val_last/acc std"]) == 0.0
    assert (tmp_path / "val_acc_vs_task.transfer_layers.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_of_different_tasks_are_not_mixed(tmp_path, capsys):
    fake_run(tmp_path / "lm", ["task=pretrain"])
    fake_classify_run(tmp_path / "cls", ["task=classify"], 0.8)
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "different metrics (val/acc, val/loss)" in capsys.readouterr().err


def test_the_machine_of_each_run_is_a_column_and_a_mix_is_warned_of(tmp_path, capsys):
    machines = [["AMD EPYC (2 threads, no native bf16); 32-true; torch 2.13.0"],
                ["AMD EPYC (2 threads, no native bf16); 32-true; torch 2.13.0",  # resumed
                 "Intel Xeon (2 threads, amx_bf16); bf16-mixed; torch 2.13.0"]]
    for i, descriptions in enumerate(machines):
        run = fake_run(tmp_path / str(i), [f"seed={i}"])
        (run / "machine.json").write_text(json.dumps([{"description": d} for d in descriptions]))
    rows = compare([str(tmp_path)], out=tmp_path)
    assert [row["machine"] for row in rows] == [" + ".join(d) for d in machines]
    assert "Intel Xeon (2 threads, amx_bf16)" in (tmp_path / "comparison.md").read_text()
    assert "trained on 2 machines" in capsys.readouterr().err
    (tmp_path / "1" / "machine.json").unlink()  # a run from before machine.json: no warning
    assert compare([str(tmp_path)], out=tmp_path)[1]["machine"] is None
    assert "machines" not in capsys.readouterr().err


def test_evaluate_reports_become_columns_and_further_metrics_get_curves(tmp_path):
    bleu = {("decoder_only", "1"): 30.0, ("decoder_only", "2"): 32.0,
            ("encoder_decoder", "1"): 34.0, ("encoder_decoder", "2"): 35.0}
    for i, ((architecture, seed), score) in enumerate(bleu.items()):
        run = fake_run(tmp_path / str(i), [f"model.architecture={architecture}", f"seed={seed}"])
        (run / ".hydra" / "config.yaml").write_text("optimized_metric: val/bleu\n"
                                                    "optimized_mode: max\n")
        (run / "csv" / "metrics.csv").write_text(
            "step,val/bleu,val/chrf,val/elapsed_s\n9,10.0,30.0,5\n19,20.0,40.0,10\n")
        (run / "evaluation-last-test.json").write_text('{"test/bleu": 1.0}')
        os.utime(run / "evaluation-last-test.json", (1, 1))  # older: the next one wins
        (run / "evaluation-best-step000019-test.json").write_text(
            json.dumps({"checkpoint": "x", "split": "test", "test/bleu": score,
                        "test/chrf": 50.0, "hypotheses": ["a"]}))
        # Newest, but another decoding: only the figures it names apart count.
        (run / "evaluation-best-step000019-test-beam1.json").write_text(
            json.dumps({"split": "test", "test/bleu": 0.5, "test_best_of_4/bleu": 7.0}))
    rows = compare([str(tmp_path)], out=tmp_path, curves=["val/chrf"])
    assert [row["test/bleu"] for row in rows] == list(bleu.values())
    assert [row["test_best_of_4/bleu"] for row in rows] == [7.0] * 4
    assert "test/chrf" in (tmp_path / "comparison.md").read_text()
    with open(tmp_path / "comparison_by_setting.csv") as f:
        by_setting = {row["setting"]: row for row in csv.DictReader(f)}
    assert float(by_setting["model.architecture=encoder_decoder"]["test/bleu mean"]) == 34.5
    assert (tmp_path / "val_chrf_curves.png").read_bytes()[:4] == b"\x89PNG"
