"""What the entry points do: train(cfg), evaluate(cfg), generate(cfg).

Each takes the composed Hydra config, builds the objects it names (`_target_`) and runs
them. train() returns the metric a Hydra sweeper optimises (cfg.optimized_metric).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gptlab.checkpoints import Checkpoint, find_checkpoint, load_checkpoint
from gptlab.errors import UserError
from gptlab.tasks.language_modeling import LanguageModelingTask
from gptlab.utils.config import flatten, to_yaml

log = logging.getLogger("gptlab")


def _instantiate_all(group: DictConfig | None) -> list:
    """Loggers and callbacks: one object per entry of their config group."""
    return [instantiate(node) for node in (group or {}).values() if node and "_target_" in node]


def _metrics(trainer_output: list[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in trainer_output[0].items()}


def train(cfg: DictConfig) -> float | None:
    """Prepare data, build the model, fit, then score the best checkpoint on the whole split."""
    log.info("Config:\n%s", to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    model_config = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    task = instantiate(
        cfg.task, _convert_="all", _recursive_=False, model_config=asdict(model_config),
        tokenizer=datamodule.tokenizer, val_bytes_per_token=datamodule.bytes_per_token("val"),
        data_config=OmegaConf.to_container(cfg.data, resolve=True),
    )
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=_instantiate_all(cfg.get("callbacks"))
    )
    config_tree = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(flatten(config_tree) | {"model/params": task.model.num_params()})
    if trainer.is_global_zero:
        _save_run_files(run_dir, task)

    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    task.eval_prefix = "val_full"
    final = _metrics(trainer.validate(
        task, dataloaders=datamodule.eval_dataloader("val"), ckpt_path=best or None,
        verbose=False,
    ))
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a multirun starts a run of its own
    monitored = trainer.checkpoint_callback.best_model_score if best else None
    results = {"val/loss": None if monitored is None else float(monitored), **final}
    if trainer.is_global_zero:
        _report_training(results, best, trainer.global_step, run_dir)
    return results.get(cfg.optimized_metric)


def _save_run_files(run_dir: Path, task: LanguageModelingTask) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    task.tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / "model_config.json").write_text(json.dumps(task.hparams.model_config, indent=2))


def _report_training(results: dict, best: str, steps: int, run_dir: Path) -> None:
    summary = {"best_checkpoint": best or None, "steps": steps, **results}
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    parts = [f"val_full/loss {results['val_full/loss']:.4f} (whole val split)",
             f"val_full/bpb {results['val_full/bpb']:.4f}"]
    if results["val/loss"] is not None:
        parts.insert(0, f"val/loss {results['val/loss']:.4f} (best checkpoint, fixed val windows)")
    print("\n" + " | ".join(parts) + f"\nrun folder: {run_dir}")


def _open_checkpoint(cfg: DictConfig) -> Checkpoint:
    path, run_dir = find_checkpoint(cfg.get("run"), cfg.get("ckpt"))
    return load_checkpoint(path, run_dir)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint on the fixed validation windows and on the whole split."""
    ckpt = _open_checkpoint(cfg)
    art = ckpt.artifacts
    data_cfg = cfg.data if cfg.get("data") else OmegaConf.create(art["data_config"])
    datamodule = instantiate(data_cfg, tokenizer=ckpt.tokenizer)
    task = LanguageModelingTask(
        model_config=art["model_config"], optimizer={}, scheduler={},
        val_bytes_per_token=datamodule.bytes_per_token(cfg.split),
    )
    task.model.load_state_dict(ckpt.weights())
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], devices=1, strategy="auto",
        enable_checkpointing=False, enable_model_summary=False,
    )
    results = {}
    for prefix, windows in ((cfg.split, datamodule.val_windows), (f"{cfg.split}_full", None)):
        task.eval_prefix = prefix
        loader = datamodule.eval_dataloader(cfg.split, windows)
        results |= _metrics(trainer.validate(task, dataloaders=loader, verbose=False))
    _print_table(results, cfg.split)
    out = _evaluation_file(ckpt)
    out.write_text(json.dumps({"checkpoint": str(ckpt.path), **results}, indent=2) + "\n")
    print(f"written to {out}")
    return results


def _evaluation_file(ckpt: Checkpoint) -> Path:
    folder = ckpt.run_dir or ckpt.path.parent
    return folder / f"evaluation-{ckpt.path.stem}.json"


def _print_table(results: dict[str, float], split: str) -> None:
    rows = [(split, "fixed windows (as logged in training)"), (f"{split}_full", "whole split")]
    print(f"\n{'metrics':<10} {'loss':>8} {'ppl':>9} {'bpb':>7}  windows")
    for prefix, what in rows:
        loss, ppl, bpb = (results[f"{prefix}/{m}"] for m in ("loss", "ppl", "bpb"))
        print(f"{prefix:<10} {loss:>8.4f} {ppl:>9.3f} {bpb:>7.4f}  {what}")


def generate(cfg: DictConfig) -> list[str]:
    """Continue a prompt: num_samples samples, batched, with the model's KV cache."""
    ckpt = _open_checkpoint(cfg)
    tokenizer = ckpt.tokenizer
    device = torch.device(cfg.device if cfg.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    model = ckpt.model().to(device)
    prompt = tokenizer.encode(cfg.prompt) if cfg.prompt else []
    if not prompt:
        prompt = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n")
    stop = tokenizer.token_to_id(cfg.stop) if cfg.get("stop") else None
    if cfg.get("stop") and stop is None:
        raise UserError(f"stop='{cfg.stop}' is not a single token of this tokenizer; "
                        f"pass a token such as '<|endoftext|>' or leave stop unset")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    samples: list[str] = []
    batches = range(0, cfg.num_samples, cfg.batch_size)
    for start in tqdm(batches, desc="generating", disable=len(batches) < 2):
        n = min(cfg.batch_size, cfg.num_samples - start)
        outputs = model.generate(
            [prompt] * n, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
            top_p=cfg.top_p, stop_token=stop, generator=generator,
        )
        samples += [cfg.prompt + tokenizer.decode(tokens) for tokens in outputs]
    for sample in samples:
        print(sample)
        print("-" * 40)
    return samples

