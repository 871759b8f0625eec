"""Every hardware= option trains: on this CPU what a CPU can run, and for the GPU configs the
Trainer, strategy, precision plugin, optimizer and clipping they compose, stepped on the CPU.

Every GPU config once stopped at its first step (fused AdamW + clipping under a mixed-precision
plugin; norm clipping under FSDP) while CPU-only tests stayed green. The same plugins run for
bf16 on a CPU, so these tests catch that class of bug here; the GPU-only tests below and
bench/gpu_check.sh cover the rest on a GPU.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gptlab import hardware
from gptlab.models.gpt import GPT, GPTConfig
from gptlab.tasks.language_modeling import LanguageModelingTask
from tests.conftest import run_entry, run_folders
from tests.test_configs import compose_train

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TASKS = {
    "pretrain": ["data=shakespeare_char"],
    "classify": ["task=classify", "data=sst2"],
    "seq2seq": ["task=seq2seq", "data=multi30k_en_de", "task.max_new_tokens=4"],
}
SHORT = ("model=nano", "debug=fast", "logger=csv", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "final_eval_tokens=256")


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_bf16_mixed_precision_and_ddp_train_every_task(task, workspace):
    """The mixed-precision plugin with the task's fused AdamW and clipping, in one process
    and in two DDP processes (what hardware=gpu and hardware=multi_gpu run on GPUs)."""
    out = run_entry("train.py", "-m", *workspace.args, *TASKS[task], *SHORT,
                    "hardware=cpu,ddp_cpu", "trainer.precision=bf16-mixed")
    runs = run_folders(out)
    assert len(set(runs)) == 2
    for run in runs:
        assert json.loads((run / "results.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_a_compiled_model_trains_on_the_cpu_and_saves_plain_weights(workspace):
    """task.compile=true on a CPU (inductor's C++ backend): it trains, and its checkpoint
    holds the GPT's own parameter names, so uncompiled runs load it."""
    out = run_entry("train.py", *workspace.args, *TASKS["pretrain"], *SHORT, "hardware=cpu",
                    "task.compile=true")
    run = run_folders(out)[-1]
    assert json.loads((run / "results.json").read_text())["steps"] == 2
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    config = json.loads((run / "model_config.json").read_text())
    plain = {f"model.{name}" for name in GPT(GPTConfig(**config)).state_dict()}
    assert {name for name in saved if name.startswith("model.")} == plain


def tiny_task(cfg) -> LanguageModelingTask:
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    return LanguageModelingTask(
        {"vocab_size": 16, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16},
        task_cfg["optimizer"], task_cfg["scheduler"])


def batches(n: int = 3):
    data = [(torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))) for _ in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=None)


@pytest.mark.parametrize("option", ["gpu", "multi_gpu"])
def test_gpu_configs_compose_a_trainer_that_steps_on_the_cpu(option, tmp_path):
    cfg = compose_train(f"hardware={option}", f"paths.root_dir={tmp_path}")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.task.optimizer.fused
    assert cfg.task.compile and cfg.float32_matmul_precision == "high"
    trainer = instantiate(cfg.trainer, accelerator="cpu", devices=1, max_steps=2, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          val_check_interval=None, default_root_dir=tmp_path)
    task = tiny_task(cfg)
    before = [p.detach().clone() for p in task.parameters()]
    try:
        trainer.fit(task, train_dataloaders=batches())
    finally:  # DDP on one device leaves a process group behind
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert trainer.global_step == 2 and trainer.gradient_clip_val == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters(), strict=True))


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_fsdp_wraps_each_block_and_clips_through_fsdp(activation_checkpointing, tmp_path):
    """Lightning allows FSDP only on GPUs: build the strategy from the config, then wrap and
    step the model with FSDP itself in a one-process CPU group, clipping as the task does."""
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from torch.distributed.fsdp import FullyShardedDataParallel

    from gptlab.models.gpt import Block

    cfg = compose_train("hardware=fsdp", f"paths.root_dir={tmp_path}",
                        f"trainer.strategy.activation_checkpointing={activation_checkpointing}")
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert (strategy._activation_checkpointing_kwargs != {}) == activation_checkpointing
    task = tiny_task(cfg)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store",
                                         rank=0, world_size=1)
    try:
        task.setup("fit")  # before wrapping, as Lightning calls it
        task.model = wrapped = FullyShardedDataParallel(
            task.model, device_id=torch.device("cpu"), use_orig_params=True,
            auto_wrap_policy=strategy.kwargs["auto_wrap_policy"])
        assert sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()) == 3
        trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False)
        trainer.strategy._lightning_module, trainer.strategy._model = task, wrapped
        # Lightning's FSDP plugin, which refuses norm clipping (the task must not ask it).
        trainer.strategy._precision_plugin = FSDPPrecision("bf16-mixed")
        task.trainer = trainer
        calls = []
        clip = wrapped.clip_grad_norm_
        wrapped.clip_grad_norm_ = lambda *a, **k: calls.append(a) or clip(*a, **k)
        optimizer = task.configure_optimizers()["optimizer"]
        x, y = next(iter(batches(1)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.training_loss((x, y))
        loss.backward()
        task.configure_gradient_clipping(optimizer, 1e-3, "norm")
        total = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in task.parameters()
                               if p.grad is not None))
        assert calls and total <= 1e-3 * 1.01  # clipped by FSDP over the shards
        optimizer.step()
        decays = {g["weight_decay"] for g in optimizer.param_groups}
        assert decays == {0.0, cfg.task.optimizer.weight_decay}  # groups by shape, not shards
    finally:
        torch.distributed.destroy_process_group()


def test_auto_precision_on_this_cpu_is_said_at_the_start(trained_runs):
    _, out = trained_runs[0]  # hardware=cpu: precision auto
    (line,) = [line for line in out.splitlines() if line.startswith("precision: ")]
    if hardware.cpu_bf16_feature() is None:
        assert line.startswith("precision: 32-true (this CPU has no native bf16")


@pytest.mark.parametrize(("feature", "fp32_s", "bf16_s", "chosen"), [
    (None, 1.0, 0.1, "32-true"),          # no native bf16: never measured, fp32
    ("amx_bf16", 1.0, 0.2, "bf16-mixed"),  # native and 5x faster for this model
    ("avx512_bf16", 1.0, 0.95, "32-true"),  # native but not faster: fp32 is exact
])
def test_auto_precision_chooses_bf16_only_where_native_and_faster(monkeypatch, feature,
                                                                  fp32_s, bf16_s, chosen):
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: feature)
    times = {"32-true": fp32_s, "bf16-mixed": bf16_s}
    precision, why = hardware.resolve_precision("auto", "cpu", times.__getitem__)
    assert precision == chosen and (feature or "no native bf16") in why
    assert hardware.resolve_precision("32-true", "cpu", times.__getitem__)[0] == "32-true"


def test_the_machine_is_described_in_one_line(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Intel Xeon 8480")
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: "amx_bf16")
    info = hardware.machine("cpu", "bf16-mixed", processes=2)
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert hardware.describe_machine(info | {"threads": 2}) == (
        f"Intel Xeon 8480 (2 threads, amx_bf16) x 2 processes; bf16-mixed; "
        f"torch {torch.__version__}")
    assert "(1 thread, amx_bf16); bf16" in hardware.describe_machine(info | {"threads": 1,
                                                                             "processes": 1})
    gpu = info | {"gpu": "NVIDIA H100", "processes": 1}
    assert hardware.describe_machine(gpu).startswith("NVIDIA H100; bf16-mixed; torch ")
    assert hardware.cpu_model()  # the real one: never empty


def test_the_step_timer_leaves_the_run_unchanged():
    task = LanguageModelingTask({"vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 1,
                                 "n_embd": 8, "dropout": 0.1}, {"lr": 1e-3},
                                {"warmup_steps": 1, "min_lr_ratio": 0.1})
    x, y = next(iter(batches(1)))
    state = torch.get_rng_state()
    seconds = hardware.step_timer(task, [lambda: task.training_loss((x, y))[0]])("32-true")
    assert seconds > 0 and torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in task.parameters())


@requires_gpu
@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_gpu_trains_every_task_compiled(task, workspace):
    out = run_entry("train.py", *workspace.args, *TASKS[task], *SHORT, "hardware=gpu")
    assert json.loads((run_folders(out)[-1] / "results.json").read_text())["steps"] == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.slow
@pytest.mark.parametrize("option", ["multi_gpu", "fsdp"])
def test_multi_gpu_strategies_train(option, workspace):
    out = run_entry("train.py", *workspace.args, *SHORT, f"hardware={option}")
    assert json.loads((run_folders(out)[-1] / "results.json").read_text())["steps"] == 2


def test_a_measured_precision_is_kept_for_the_model_and_a_resume_keeps_its_own(monkeypatch,
                                                                              tmp_path):
    """Timings under load once gave two runs of one command different arithmetic (and a
    resumed run another precision than its first half): auto measures once per model."""
    from types import SimpleNamespace

    from gptlab import pipeline

    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: "avx512_bf16")
    timings = []  # a busy machine: bf16 wins the first measurement, fp32 would win the next
    speeds = iter([{"32-true": 1.0, "bf16-mixed": 0.5}, {"32-true": 0.5, "bf16-mixed": 1.0}])

    def step_timer(module, steps):
        times = next(speeds)
        return lambda precision: timings.append(precision) or times[precision]

    monkeypatch.setattr(hardware, "step_timer", step_timer)
    cfg = OmegaConf.create({"trainer": {"precision": "auto", "accelerator": "cpu"},
                            "paths": {"cache_dir": str(tmp_path / "cache")}})
    def data(length: int) -> SimpleNamespace:
        # a batch may carry objects that are not JSON (the agent's turns to generate)
        batch = {"input_ids": torch.zeros(4, length, dtype=torch.long), "turns": [[object()]]}
        return SimpleNamespace(train_dataloader=lambda: [batch])

    task = SimpleNamespace(hparams=SimpleNamespace(model_config={"n_layer": 1}),
                           training_loss=lambda b: (torch.zeros(()), {}))
    assert pipeline._precision(cfg, task, data(8), resume=None) == "bf16-mixed"
    assert len(timings) == 2 and list((tmp_path / "cache" / "precision").glob("*.json"))
    # another seed of a sweep: its first batches have other lengths, the choice stays
    assert pipeline._precision(cfg, task, data(5), resume=None) == "bf16-mixed"
    assert len(timings) == 2  # read back, not timed again
    other = SimpleNamespace(hparams=SimpleNamespace(model_config={"n_layer": 2}),
                            training_loss=task.training_loss)
    assert pipeline._precision(cfg, other, data(8), resume=None) == "32-true"  # its own timing

    run = tmp_path / "run"
    run.mkdir()
    (run / "machine.json").write_text(json.dumps([{"precision": "32-true"}]))
    resume = SimpleNamespace(path=run / "checkpoints" / "last.ckpt", run_dir=run)
    assert pipeline._precision(cfg, task, data(8), resume=resume) == "32-true"
    assert len(timings) == 4
