"""What makes a run's numbers trustworthy: checkpoints that cannot run code, resumes that
refuse to continue something else, divergence that stops the run, writes that are atomic."""

from __future__ import annotations

import json
import os
import pathlib
from pathlib import Path

import pytest
import torch

from gptlab.checkpoints import UnsafeCheckpoint, check_stored_config
from gptlab.tasks.base import FirstNonFiniteStep, NonFiniteLoss
from gptlab.utils.files import save_atomic, write_atomic
from tests.conftest import metrics_column, run_entry, run_folder, run_folders
from tests.test_user_errors import fails, fingerprint, train_fails


class WritesAFile:
    """A pickle payload: unpickling it with weights_only=False would create `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.write_text, (self.path, "this file should not exist")


def test_a_checkpoint_whose_data_config_would_write_a_file_is_refused(trained_runs, tmp_path):
    run, _ = trained_runs[0]
    target = tmp_path / "written-by-a-checkpoint.txt"
    contents = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    contents["gptlab"]["data_config"]["source"] = {
        "_target_": "pathlib.Path.write_text",
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(target)]}, "pwned"]}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(contents, crafted)
    line = fails("evaluate.py", f"ckpt={crafted}")
    assert "pathlib.Path.write_text" in line and "nothing was run" in line
    assert not target.exists()


def test_a_checkpoint_that_pickles_code_is_refused_everywhere(workspace, tmp_path):
    target = tmp_path / "written-by-unpickling.txt"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": WritesAFile(target)}, crafted)
    for script, arg in (("evaluate.py", f"ckpt={crafted}"), ("generate.py", f"ckpt={crafted}")):
        assert "corrupt or not a checkpoint" in fails(script, arg)
    line = train_fails(workspace, f"ckpt_path={crafted}")  # the resume path too
    assert "corrupt or not a checkpoint" in line
    assert not target.exists()


@pytest.mark.parametrize("config", [
    {"_target_": "gptlab.data.sources.Path", "_args_": ["/tmp/x"]},  # a name imported there
    {"_target_": "gptlab.data.lm_datamodule.LMDataModule", "_partial_": True},
    {"_target_": "gptlab.data.lm_datamodule.LMDataModule", "name": "${oc.env:HOME}"},
    {"sources": [{"_target_": "os.system", "_args_": ["true"]}]},
])
def test_stored_configs_may_only_build_gptlab_data_classes(config):
    with pytest.raises(UnsafeCheckpoint):
        check_stored_config(config, "a test checkpoint")


def test_resume_refuses_a_command_line_that_trains_something_else(trained_runs, workspace):
    run, _ = trained_runs[0]
    before = fingerprint(run)
    line = train_fails(workspace, f"resume={run}", "task.optimizer.lr=0.1", "model.n_embd=96")
    assert "model.n_embd (run: 48, now: 96)" in line and "task.optimizer.lr" in line
    assert fingerprint(run) == before


def test_resume_auto_finds_the_latest_run_of_the_same_command_line(workspace, tmp_path):
    args = (*workspace.args, "model=nano", "debug=fast", "logger=csv", "hardware=cpu",
            "seed=4242", "trainer.max_steps=3")
    first = run_folder(run_entry("train.py", *args))
    other = run_folder(run_entry("train.py", *args[:-1], "trainer.max_steps=4"))
    out = run_entry("train.py", "resume=auto", *args, "logger=none")  # another logger is fine
    assert run_folder(out) == first != other and "Continuing the run" in out


def test_ckpt_path_that_does_not_exist_or_belongs_to_another_model(trained_runs, workspace):
    assert "ckpt_path=/no/such.ckpt does not exist" in train_fails(
        workspace, "ckpt_path=/no/such.ckpt")
    run, _ = trained_runs[0]
    line = train_fails(workspace, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                       "model=micro")
    assert "model.n_layer (run: 3, now: 4)" in line


def test_a_diverging_run_stops_at_its_first_non_finite_loss(workspace):
    run = workspace.root / "diverging"
    line = train_fails(workspace, "task.optimizer.lr=1e30", "trainer.gradient_clip_val=0",
                       f"hydra.run.dir={run}")
    assert "not finite at step" in line and "skip_nonfinite" in line
    assert not (run / "results.json").exists()  # it did not report a result


def test_first_non_finite_step_is_found_with_and_without_waiting():
    now, later = FirstNonFiniteStep(immediate=True), FirstNonFiniteStep(immediate=False)
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf")]):
        if step < 2:
            now.update(torch.tensor(value), step)
        later.update(torch.tensor(value), step)
    with pytest.raises(NonFiniteLoss, match="step 2"):
        now.update(torch.tensor(float("nan")), 2)
    with pytest.raises(NonFiniteLoss, match="step 2"):  # the first, though read later
        later.check()


@pytest.mark.slow
def test_skip_nonfinite_skips_the_bad_steps_and_trains_on(workspace, monkeypatch):
    """A batch that yields a NaN loss (here: every third) is skipped, not trained on."""
    import lightning as L

    from gptlab.tasks.language_modeling import LanguageModelingTask

    class SometimesNaN(LanguageModelingTask):
        def training_loss(self, batch):
            loss, figures = super().training_loss(batch)
            return (loss * float("nan") if self.trainer.global_step == 3 else loss), figures

    task = SometimesNaN({"vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 1,
                         "n_embd": 8}, {"lr": 1e-3}, {"warmup_steps": 1, "min_lr_ratio": 0.1},
                        skip_nonfinite=True)
    batches = [(torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))) for _ in range(8)]
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, log_every_n_steps=1)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert task.skipped_steps == 1 and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in task.parameters())


@pytest.mark.slow
def test_a_failing_job_of_a_multirun_fails_alone(workspace):
    out = run_entry("train.py", "-m", *workspace.args, "model=nano", "debug=fast",
                    "logger=csv", "hardware=cpu", "trainer.gradient_clip_val=0",
                    "task.optimizer.lr=1e30,1e-3", expect_rc=1)
    # Once when the job fails, once in the summary at the end of the sweep.
    assert out.count("error: the training loss is not finite") == 2 and "Traceback" not in out
    (finished,) = run_folders(out)  # the other job ran to its end
    assert json.loads((finished / "results.json").read_text())["steps"] == 6


def test_output_file_in_a_missing_folder_and_a_missing_gpu(trained_runs, tmp_path):
    run, _ = trained_runs[0]
    line = fails("generate.py", f"run={run}", f"output_file={tmp_path}/no/such/out.txt")
    assert "its folder does not exist" in line
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in fails("generate.py", f"run={run}", "device=cuda")


def test_atomic_writes_leave_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "old")

    def crash(f):
        f.write(b"half of the new")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        save_atomic(path, crash)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_checkpoints_are_written_beside_their_target_then_renamed(trained_runs, monkeypatch):
    """No temp file in $TMPDIR: a rename across filesystems would copy over the old file."""
    from gptlab.checkpoints import AtomicCheckpointIO

    run, _ = trained_runs[0]
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    target = run.parent / "atomic-test.ckpt"
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, target)
    ((source, dest),) = renames
    assert Path(source).parent == target.parent and Path(dest) == target
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(target)["x"], torch.ones(2))
    target.unlink()


def test_a_resumed_run_keeps_its_wandb_run_and_metrics(workspace, tmp_path):
    args = (*workspace.args, "model=nano", "debug=fast", "logger=many", "hardware=cpu")
    run = run_folder(run_entry("train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"))
    rows, started_with = metrics_column(run, "val/loss"), fingerprint(run / ".hydra")
    run_entry("train.py", f"resume={run}", *args)  # a finished run: only the final passes
    assert metrics_column(run, "val/loss") == rows
    assert fingerprint(run / ".hydra") == started_with  # the run's own config stays
    ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
