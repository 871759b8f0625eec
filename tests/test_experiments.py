"""Sweeps, launchers and the experiment= reproductions, run through train.py with debug=fast."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode

from gptlab.utils.config import register_resolvers
from tests.conftest import REPO, metrics_column, run_entry, run_folder, run_folders, wandb_records
from tests.test_configs import compose_train

FAST = ("debug=fast", "hardware=cpu")


def sweep_runs(out: str) -> list[Path]:
    """The job folders that train.py printed, in order, without the shared pretraining."""
    return [run for run in run_folders(out) if run.parent.name != "shared"]


def table(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def make(*args: str) -> subprocess.CompletedProcess:
    """A make target with this interpreter's environment, without (re)installing .venv."""
    return subprocess.run(["make", "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def final(run: Path, name: str) -> float:
    return json.loads((run / "results.json").read_text())[name]


@pytest.mark.slow
def test_optuna_search_runs_three_trials_and_reports_the_best(workspace):
    out = run_entry("train.py", "hparams_search=pretrain_optuna", *workspace.args, *FAST,
                    "logger=csv", "hydra.sweeper.n_trials=3",
                    "hydra.sweeper.sampler.n_startup_trials=2")
    runs = sweep_runs(out)
    assert len(runs) == 3
    best = yaml.safe_load((runs[0].parent / "optimization_results.yaml").read_text())
    # The sweeper minimised what train() returned: each trial's best val/loss.
    assert best["best_value"] == pytest.approx(min(final(run, "val/loss") for run in runs))
    assert set(best["best_params"]) == {"task.optimizer.lr", "data.batch_size",
                                        "model.dropout", "model.n_layer", "model.n_embd"}


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(workspace):
    out = run_entry("train.py", "-m", "hydra/launcher=submitit_local", *workspace.args, *FAST,
                    "model=nano", "logger=csv", "task.optimizer.lr=1e-3,3e-3")
    assert "Submitit 'local' sweep output dir" in out
    sweep = Path(out.split("sweep output dir : ")[1].split()[0])
    for job in ("0", "1"):  # each job ran in a process of its own and finished
        assert json.loads((sweep / job / "results.json").read_text())["steps"] == 6
    assert (sweep / "comparison.md").read_text().count("task.optimizer.lr=") == 2


@pytest.mark.parametrize("search", ["pretrain_optuna", "classify_optuna"])
def test_every_search_space_composes_with_its_task(search):
    register_resolvers()
    task = search.split("_")[0]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [f"task={task}", f"hparams_search={search}"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == f"{cfg.optimized_mode}imize" and sweeper.sampler.seed
    assert cfg.optimized_metric == {"pretrain": "val/loss", "classify": "val/acc"}[task]


def test_slurm_launcher_gives_every_gpu_a_task():
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "hardware=multi_gpu",
                                "hydra.launcher.partition=gpu",
                                "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 4 and cfg.trainer.strategy == "ddp"
    # Warned before the time limit (the run saves its step) and requeued by submitit.
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0


def test_a_preempted_job_hands_its_requeue_to_submitit(tmp_path):
    """Under submitit the signal's own handler requeues; gptlab only saved first."""
    import signal

    from gptlab.callbacks import Preempted

    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)

    submitit_handler.__module__ = "submitit.core.job_environment"
    Preempted(signal.SIGUSR2, 7, tmp_path / "last.ckpt", submitit_handler).requeue()
    assert calls == [signal.SIGUSR2]


@pytest.mark.slow
def test_gpt1_ablation_pretrains_once_then_fine_tunes_every_variant(workspace):
    args = ("experiment=gpt1_ablation", *workspace.args, *FAST, "logger=many")
    out = run_entry("train.py", *args, "ablation=full,no_pretraining", "seed=1,2")
    assert out.count("Pretraining once for this sweep") == 1
    assert out.count("Starting from the shared pretraining run") == 1  # full, seed 2
    runs = sweep_runs(out)
    sweep = runs[0].parent
    assert len(runs) == 4 and (sweep / "val_curves.png").is_file()

    rows = table(sweep / "comparison_by_setting.csv")
    assert [(r["setting"], r["runs"]) for r in rows] == [("ablation=full", "2"),
                                                        ("ablation=no_pretraining", "2")]
    for row, jobs in zip(rows, (runs[:2], runs[2:]), strict=True):
        accuracies = [final(run, "val_last/acc") for run in jobs]
        assert float(row["val_last/acc mean"]) == pytest.approx(statistics.fmean(accuracies))
        assert float(row["val_last/acc std"]) == pytest.approx(statistics.stdev(accuracies))
    assert [r["reference"] for r in rows] == ["0.913", "0.84"]  # GPT-1's published figures

    (wandb_file,) = (runs[0] / "wandb").glob("offline-run-*/run-*.wandb")
    summaries = {r.metric.name: r.metric.summary for r in wandb_records(wandb_file)
                 if r.HasField("metric")}
    assert summaries["val/acc"].max and summaries["val/loss"].min

    # A pretraining that stopped after a checkpoint is continued in its folder, not redone.
    (shared,) = [p for p in (workspace.root / "logs" / "pretrain" / "shared").iterdir()
                 if p.is_dir()]
    (shared / "results.json").unlink()
    rows = metrics_column(shared, "val/loss")
    out = run_entry("train.py", *args, "ablation=no_aux_lm", "seed=1")
    assert "stopped before its end; continuing it" in out and "Continuing the run" in out
    assert metrics_column(shared, "val/loss") == rows  # nothing was trained again
    assert json.loads((shared / "results.json").read_text())["steps"] == 6


def test_the_shared_pretraining_is_keyed_by_config_code_and_data(tmp_path, monkeypatch):
    """An edited config, code or data file trains anew; where and how it runs does not."""
    from gptlab import pretrain_once

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to pretrain on\n" * 50)
    overrides = ["model=nano", "data=text_files", f"data.source.paths=[{corpus}]"]
    compose_train(f"paths.root_dir={tmp_path}")  # the job's own Hydra config
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        def folder(*extra: str) -> str:
            return pretrain_once.shared_run_dir(tmp_path, "x", [*overrides, *extra]).name

        first = folder()
        assert folder() == first == folder("logger=csv", "hardware=cpu")
        assert folder("model.n_embd=96") != first
        corpus.write_text("other text to pretrain on\n" * 50)
        changed_data = folder()
        assert changed_data != first
        monkeypatch.setattr(pretrain_once, "code_version", lambda conf_dir: "edited")
        assert folder() != changed_data


@pytest.mark.slow
def test_gpt1_layers_and_scaling_draw_their_figures(workspace):
    out = run_entry("train.py", "experiment=gpt1_layers", *workspace.args, *FAST,
                    "logger=csv", "task.transfer_layers=0,4", "seed=1")
    # One shared pretraining, whichever test made it: the logger (many in the ablation's
    # test, csv here) is not part of what identifies it.
    shared = workspace.root / "logs" / "pretrain" / "shared"
    assert len([p for p in shared.iterdir() if p.is_dir() and "crashed" not in p.name]) == 1
    sweep = sweep_runs(out)[0].parent
    assert (sweep / "val_acc_vs_task.transfer_layers.png").is_file()

    out = run_entry("train.py", "experiment=scaling", *workspace.args, *FAST, "logger=csv",
                    "model.n_embd=32,48,64")
    sweep = sweep_runs(out)[0].parent
    assert (sweep / "val_loss_vs_params.png").is_file() and "power law over 3 points" in out
    assert [int(r["params"]) for r in table(sweep / "comparison.csv")] == sorted(
        int(r["params"]) for r in table(sweep / "comparison.csv"))

    out = run_entry("train.py", "experiment=scaling_tokens", *workspace.args, *FAST,
                    "logger=csv", "trainer.max_steps=3,6,9")
    sweep = sweep_runs(out)[0].parent
    assert [int(r["tokens"]) for r in table(sweep / "comparison.csv")] == [
        steps * 4 * 64 for steps in (3, 6, 9)]
    assert (sweep / "val_loss_vs_tokens.png").is_file()


def is_single_run(experiment: str) -> bool:
    """Multiruns (set in the experiment or in one it builds on, as scaling_tokens builds on
    scaling) are tested one by one above; recipes from hub weights (init_from: hf:...) need
    the network, so test_hf.py runs them from a local model."""
    cfg = compose_train(f"experiment={experiment}")
    return (cfg.hydra.mode != RunMode.MULTIRUN
            and not str(cfg.task.get("init_from") or "").startswith("hf:"))


SINGLE_RUN_EXPERIMENTS = sorted(
    p.stem for p in (REPO / "conf" / "experiment").glob("[!_]*.yaml") if is_single_run(p.stem))


def test_the_single_run_experiments_are_found():  # else the test below would run none
    assert {"sst2_finetune", "summarize_aeslc", "agent_taskmaster4"} <= set(
        SINGLE_RUN_EXPERIMENTS)
    assert not {"scaling", "scaling_tokens", "sst2_finetune_gpt2"} & set(SINGLE_RUN_EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", SINGLE_RUN_EXPERIMENTS)
def test_every_single_run_experiment_runs_with_debug_fast(experiment, workspace):
    # One run each (a GPU recipe on the CPU, uncompiled), so each has its own time limit.
    out = run_entry("train.py", f"experiment={experiment}", *workspace.args, *FAST,
                    "logger=csv", "task.compile=false")
    assert json.loads((run_folder(out) / "results.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_seq2seq_architectures_trains_both_architectures_and_compares_them(workspace):
    """Both rows through the real sweep (make's target: train, evaluate, compare), under DDP
    on two CPU processes (hardware=ddp_cpu)."""
    args = [*workspace.args, *FAST, "logger=csv", "hardware=ddp_cpu", "task.max_new_tokens=4"]
    proc = make("seq2seq-architectures", "SEEDS=1", f"ARGS={' '.join(args)}",
                "EVAL_ARGS=trainer.limit_val_batches=1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = sweep_runs(proc.stderr)  # train.py's output, teed to standard error
    architectures = [json.loads((run / "model_config.json").read_text())["architecture"]
                     for run in runs]
    assert architectures == ["decoder_only", "encoder_decoder"]
    assert all(final(run, "steps") == 6 for run in runs)
    sweep = runs[0].parent
    rows = table(sweep / "comparison.csv")
    assert [row["run"] for row in rows] == ["seq2seq_architecture=decoder_only",
                                            "seq2seq_architecture=encoder_decoder"]
    assert int(rows[1]["params"]) == pytest.approx(int(rows[0]["params"]), rel=0.005)
    for name in ("val_curves.png", "val_chrf_curves.png", "val_loss_curves.png"):
        assert (sweep / name).is_file(), name
    assert "test/bleu" in rows[0]  # redrawn after evaluate.py


@pytest.mark.slow
def test_a_recipe_with_seeds_trains_evaluates_and_averages_every_seed(workspace):
    """make <recipe> SEEDS=1,2: a run per seed, each scored by evaluate.py, then the figures'
    mean and spread over the seeds printed and written beside the runs."""
    args = [*workspace.args, *FAST, "logger=csv", "task.max_new_tokens=4"]
    proc = make("translate-multi30k", "SEEDS=1,2", f"ARGS={' '.join(args)}",
                "EVAL_ARGS=trainer.limit_val_batches=1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = run_folders(proc.stderr)  # train.py's output, teed to standard error
    assert [yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"]
            for run in runs] == [1, 2]
    (setting,) = table(runs[0].parent / "comparison_by_setting.csv")
    assert setting["setting"] == "(all runs)" and setting["runs"] == "2"
    bleu = [final_evaluation(run, "test/bleu") for run in runs]
    assert float(setting["test/bleu mean"]) == pytest.approx(statistics.fmean(bleu), abs=1e-3)
    assert "| (all runs) | 2 |" in proc.stdout and " ± " in proc.stdout


def final_evaluation(run: Path, name: str) -> float:
    (report,) = run.glob("evaluation-*-test.json")
    return json.loads(report.read_text())[name]
