"""Runs that survive a crash or a preemption and continue exactly where they stopped."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_entry, run_folder

# Short runs with dropout (so an RNG state that is not restored shows), several validations,
# checkpoints and logging windows that do not line up with them.
PRETRAIN = ("model=nano", "model.dropout=0.1", "logger=csv", "hardware=cpu",
            "trainer.max_steps=24", "trainer.val_check_interval=6", "trainer.log_every_n_steps=4",
            "trainer.limit_val_batches=2", "data.batch_size=4", "data.eval_batch_size=8",
            "task.scheduler.warmup_steps=2", "final_eval_tokens=2048")
# Three epochs of a small labeled set (length buckets, dropout, head dropout, aux LM loss).
FINETUNE = ("task=classify", "model=nano", "model.dropout=0.1", "logger=csv", "hardware=cpu",
            "trainer.max_steps=24", "trainer.val_check_interval=5", "trainer.log_every_n_steps=3",
            "data.batch_size=8", "data.eval_batch_size=16", "task.scheduler.warmup_steps=2",
            "task.aux_lm_weight=0.5", "final_eval_tokens=2048")
STEADY = ("train/loss", "train/tokens", "train/lr", "val/loss", "val/acc", "val/acc_best",
          "val/f1", "val/bpb", "val_last/loss", "val_full/loss", "val_last/acc", "val_full/acc")


def metric_rows(run: Path) -> list[dict]:
    """metrics.csv without the columns that measure time, as printed (4 decimals)."""
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: f"{float(v):.4f}" for k, v in row.items() if v and k in (*STEADY, "step")}
            for row in rows]


def labeled_files(folder: Path) -> list[str]:
    """A tiny sentiment set: 80 train rows (10 batches of 8: an epoch is 10 steps), 24 val."""
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    for split, n in (("train", 80), ("val", 24)):
        lines = ["text\tlabel"] + [
            f"{' '.join(words[(i * k) % 6] for k in range(1, 2 + i % 7))}\t{int(i % 6 < 3)}"
            for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return ["data=labeled_files", "data.vocab_size=300",
            f"data.source.files.train={folder}/train.tsv",
            f"data.source.files.val={folder}/val.tsv"]


def start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def new_run_folder(runs: Path, before: set[Path], timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(runs.glob("*")) - before
        if new:
            return new.pop()
        time.sleep(0.05)
    raise AssertionError(f"no new run folder in {runs}")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def killed_after_first_checkpoint(args: list[str], runs: Path) -> Path:
    """Start a run, SIGKILL it as soon as its first checkpoint exists; its run folder."""
    before = set(runs.glob("*")) if runs.is_dir() else set()
    proc = start(args)
    folder = new_run_folder(runs, before)
    wait_for(folder / "checkpoints" / "last.ckpt", proc)
    proc.kill()
    proc.communicate()
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "finetune", "finetune_ema"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_rows(kind, workspace, tmp_path):
    if kind == "pretrain":
        args, runs = [*workspace.args, *PRETRAIN], workspace.root / "logs" / "pretrain" / "runs"
    else:
        args = [*workspace.args, *FINETUNE, *labeled_files(tmp_path)]
        runs = workspace.root / "logs" / "classify" / "runs"
    if kind == "finetune_ema":  # the checkpoint carries both the average and the raw weights
        args += ["callbacks=ema", "callbacks.ema.decay=0.8"]
    whole = run_folder(run_entry("train.py", *args))
    folder = killed_after_first_checkpoint(args, runs)
    stopped_at = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at < 24
    out = run_entry("train.py", f"resume={folder}", *args)
    assert run_folder(out) == folder  # the same folder, not a new one
    assert metric_rows(folder) == metric_rows(whole)
    assert len(json.loads((folder / "machine.json").read_text())) == 1  # same machine: once
    results = [json.loads((run / "results.json").read_text()) for run in (whole, folder)]
    for name in ("val/loss", "val_full/loss", "val_last/loss", "val/acc", "steps"):
        assert results[0].get(name) == results[1].get(name)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_non_zero(workspace):
    # Far more steps than a second of training reaches on a fast CPU (a Zen 4 in bf16 made
    # 124 steps, past a validation at 100), so the signal lands before the first validation.
    args = [*workspace.args, *PRETRAIN, "trainer.max_steps=5000", "trainer.val_check_interval=2000"]
    runs = workspace.root / "logs" / "pretrain" / "runs"
    before = set(runs.glob("*")) if runs.is_dir() else set()
    proc = start(args)
    folder = new_run_folder(runs, before)
    wait_for(folder / "csv" / "hparams.yaml", proc)  # training has started
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < ckpt["global_step"] < 2000  # the step it was at, not the last validation's
    assert f"Continue with: python train.py resume={folder}" in out
    assert not (folder / "results.json").exists()  # it does not look finished


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_and_requeues_the_job(workspace, tmp_path):
    """SLURM's warning signal: checkpoint, then `scontrol requeue <job>` (a fake one here)."""
    calls = tmp_path / "scontrol-calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{scontrol.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    # More steps than a second of training reaches on a fast CPU, so the signal finds it running.
    args = [*workspace.args, *PRETRAIN, "trainer.max_steps=600", "trainer.val_check_interval=300"]
    runs = workspace.root / "logs" / "pretrain" / "runs"
    before = set(runs.glob("*")) if runs.is_dir() else set()
    proc = start(args, env=env)
    folder = new_run_folder(runs, before)
    wait_for(folder / "csv" / "hparams.yaml", proc)
    time.sleep(1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    # The requeued job runs the same command into the same folder and continues by itself.
    out = run_entry("train.py", *args, f"hydra.run.dir={folder}", env={"SLURM_JOB_ID": "4242"})
    assert "Continuing the run" in out and run_folder(out) == folder
    assert json.loads((folder / "results.json").read_text())["steps"] == 600
