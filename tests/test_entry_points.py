"""The real entry points, run as a user runs them: train, then evaluate and generate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptlab import hardware
from gptlab.reporting.compare import compare
from tests.conftest import metrics_column, run_entry, run_folder, run_folders, wandb_records


def test_train_writes_a_complete_run_folder(trained_runs):
    run, out = trained_runs[0]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "tokenizer.json").is_file() and (run / "model_config.json").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    for name in ("train/loss", "train/lr", "train/tokens", "train/elapsed_s",
                 "train/tokens_per_s", "val/loss", "val/ppl", "val/bpb", "val/tokens",
                 "val/elapsed_s", "val_full/loss"):
        assert metrics_column(run, name), f"{name} missing from metrics.csv"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6
    assert f"run folder: {run}" in out and "val_full/loss" in out
    (machine,) = json.loads((run / "machine.json").read_text())  # where its figures came from
    # precision: auto, timed on a CPU with native bf16: either choice, the one it announced
    assert f"precision: {machine['precision']} (" in out and machine["processes"] == 1
    assert f"machine: {machine['description']}" in out


def test_runs_started_together_get_their_own_folders_and_same_seed_same_curve(trained_runs):
    (a, _), (b, _) = trained_runs
    assert a != b
    assert metrics_column(a, "train/loss") == metrics_column(b, "train/loss")
    assert metrics_column(a, "val/loss") == metrics_column(b, "val/loss")


def test_checkpoint_loads_weights_only_and_carries_config_and_tokenizer(trained_runs):
    run, _ = trained_runs[0]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    artifacts = ckpt["gptlab"]
    assert artifacts["task"] == "pretrain"
    assert artifacts["model_config"]["n_layer"] == 3
    assert json.loads(artifacts["tokenizer"]) == json.loads((run / "tokenizer.json").read_text())


def test_evaluate_reproduces_the_logged_val_loss(trained_runs, tmp_path):
    run, _ = trained_runs[0]
    out = run_entry("evaluate.py", f"run={run}", cwd=tmp_path)
    results = json.loads((run / "results.json").read_text())
    written = json.loads(next(run.glob("evaluation-best-*.json")).read_text())
    assert written["val/loss"] == pytest.approx(results["val/loss"], abs=1e-3)
    assert written["val_full/loss"] == pytest.approx(results["val_full/loss"], abs=1e-4)
    assert written["val_full/ppl"] == pytest.approx(math.exp(written["val_full/loss"]), rel=1e-4)
    assert "whole split" in out and "val_full" in out
    assert f"machine: {written['machine']}" in out and hardware.cpu_model() in written["machine"]


def test_generate_prints_samples_that_continue_the_prompt(trained_runs, tmp_path):
    run, _ = trained_runs[0]
    out = run_entry("generate.py", f"run={run}", "prompt=ROMEO:", "num_samples=3",
                    "max_new_tokens=20", cwd=tmp_path)
    samples = [line for line in out.splitlines() if line.startswith("ROMEO:")]
    assert len(samples) >= 3


def test_generate_is_reproducible_with_a_seed(trained_runs, tmp_path):
    run, _ = trained_runs[0]
    args = (f"run={run}", "prompt=KING", "num_samples=2", "max_new_tokens=30", "seed=7")
    assert run_entry("generate.py", *args, cwd=tmp_path) == run_entry(
        "generate.py", *args, cwd=tmp_path)


@pytest.mark.slow
def test_ema_weights_are_what_validation_checkpoints_and_final_passes_use(workspace, tmp_path):
    out = run_entry("train.py", *workspace.args, "model=nano", "debug=fast", "logger=csv",
                    "hardware=cpu", "data.val_windows=4", "final_eval_tokens=null",
                    "callbacks=ema", "callbacks.ema.decay=0.5")
    run = run_folder(out)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]  # raw: for resuming
    assert averaged.keys() == raw.keys()
    assert not torch.equal(averaged["model.wte.weight"], raw["model.wte.weight"])
    # The end-of-run pass scored the averaged weights, which evaluate.py reads from last.ckpt.
    run_entry("evaluate.py", f"ckpt={last}", cwd=tmp_path)
    written = json.loads((run / "evaluation-last-val.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert written["val_full/loss"] == pytest.approx(results["val_last/loss"], abs=1e-5)


@pytest.mark.slow
def test_ckpt_path_continues_a_checkpoint_in_a_new_run_folder(trained_runs, workspace):
    run, _ = trained_runs[0]
    out = run_entry("train.py", *workspace.args, "model=nano", "debug=fast", "logger=csv",
                    "hardware=cpu", "data.val_windows=4", "final_eval_tokens=null",
                    f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    resumed = run_folder(out)
    assert resumed != run and "Continuing the run" in out
    assert json.loads((resumed / "results.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_in_a_multirun(workspace):
    """Each job trains on two ranks; the second rank re-runs its job, never the whole sweep."""
    out = run_entry("train.py", "-m", *workspace.args, "model=nano", "debug=fast",
                    "logger=csv", "hardware=ddp_cpu", "task.optimizer.lr=1e-3,3e-3")
    runs = sorted(set(run_folders(out)))
    sweep = runs[0].parent
    assert [run.name for run in runs] == ["0", "1"] and runs[1].parent == sweep
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert out.count("Launching 2 jobs") == 1
    for run in runs:
        assert list((run / "checkpoints").glob("best-*.ckpt"))
        # Both processes share one stream of steps: 6 optimizer steps, not 12, each of two
        # batches of 4 windows of 64 tokens.
        assert json.loads((run / "results.json").read_text())["steps"] == 6
        assert metrics_column(run, "train/tokens")[-1] == 6 * 2 * 4 * 64


@pytest.mark.slow
def test_wandb_runs_offline_without_a_login(workspace, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(workspace.root))  # no ~/.netrc: not logged in
    out = run_entry("train.py", *workspace.args, "model=nano", "debug=fast", "logger=many",
                    "tags=[smoke,nano]")
    run = run_folder(out)
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert metrics_column(run, "val/loss")
    records = wandb_records(run_file)
    (run_record,) = [r.run for r in records if r.HasField("run")]
    assert list(run_record.tags) == ["smoke", "nano"] and run_record.run_group == "pretrain"
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config")
              for u in r.config.update}
    # Flattened, so W&B's run table filters by any key; with the model's size.
    assert config["task.optimizer.lr"] == 6e-3 and config["model.n_layer"] == 3
    assert config["model/params"] > 0 and config["data.batch_size"] == 4
    summaries = {r.metric.name: r.metric.summary for r in records if r.HasField("metric")}
    assert summaries["val/loss"].min and summaries["val/loss"].last
    assert summaries["val/bpb"].min and not summaries["val/bpb"].max


@pytest.mark.slow
def test_bpe_data_and_another_model_size_compose_and_run(workspace):
    out = run_entry("train.py", *workspace.args, "model=micro", "data=shakespeare_bpe",
                    "data.vocab_size=512", "hardware=cpu", "logger=csv", "debug=fast",
                    "model.block_size=32")
    run = run_folder(out)
    assert json.loads((run / "model_config.json").read_text())["vocab_size"] == 512


@pytest.mark.slow
def test_own_text_files_and_a_hugging_face_dataset_train(workspace, tmp_path):
    sentence = "The quick brown fox jumps over the lazy dog while {} cats watch.\n"
    for i in range(2):
        (tmp_path / f"notes{i}.txt").write_text("".join(sentence.format(n) for n in range(300)))
    common = (*workspace.args, "model=nano", "debug=fast", "logger=csv", "data.vocab_size=300")
    # Two documents are too few to split by document (test_data_entry_points has many).
    out = run_entry("train.py", *common, "data=text_files", "data.split_by=contiguous",
                    f"data.source.paths=[{tmp_path}/notes*.txt]")
    assert json.loads((run_folder(out) / "results.json").read_text())["val_full/loss"] > 0

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": sentence.format(n)}) + "\n" for n in range(600)))
    out = run_entry("train.py", *common, "data=hf_dataset", "data.source.path=json",
                    f"data.source.data_files={rows}",
                    env={"HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"})
    assert json.loads((run_folder(out) / "model_config.json").read_text())["vocab_size"] <= 300


@pytest.mark.slow
def test_a_multirun_sweep_writes_one_folder_per_run_and_one_wandb_group(workspace, tmp_path):
    out = run_entry("train.py", "-m", *workspace.args, "model=nano", "debug=fast",
                    "logger=many", "task.optimizer.lr=1e-3,3e-3", "data.batch_size=4,8")
    runs = run_folders(out)
    sweep = runs[0].parent
    assert len(set(runs)) == 4 and all(run.parent == sweep for run in runs)
    group = f"pretrain-{sweep.name}".encode()
    for run in runs:
        assert list((run / "checkpoints").glob("best-*.ckpt"))
        assert json.loads((run / "results.json").read_text())["steps"] == 6
        (wandb_run,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # one run per job
        assert group in wandb_run.read_bytes()

    rows = compare([str(sweep)], out=tmp_path)
    assert sorted(row["run"] for row in rows) == [
        "task.optimizer.lr=0.001 data.batch_size=4", "task.optimizer.lr=0.001 data.batch_size=8",
        "task.optimizer.lr=0.003 data.batch_size=4", "task.optimizer.lr=0.003 data.batch_size=8"]
