"""What the entry points do: train(cfg), evaluate(cfg), generate(cfg).

Each takes the composed Hydra config, builds the objects it names (`_target_`) and runs
them. train() returns the metric a Hydra sweeper optimises (cfg.optimized_metric).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, read_write
from tqdm import tqdm

from gptlab.checkpoints import Checkpoint, find_checkpoint, load_checkpoint, load_pretrained
from gptlab.data.sources import read_text
from gptlab.data.tokenizers import KINDS, from_spec
from gptlab.errors import UserError
from gptlab.pretrain_once import pretrain_once
from gptlab.tasks.base import GPTTask
from gptlab.utils.config import flatten, to_yaml

log = logging.getLogger("gptlab")

LOWER_IS_BETTER = ("loss", "ppl", "bpb")  # validation metrics; all others are better higher


def _instantiate_all(group: DictConfig | None) -> list:
    """Loggers and callbacks: one object per entry of their config group."""
    return [instantiate(node) for node in (group or {}).values() if node and "_target_" in node]


def _metrics(trainer_output: list[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in trainer_output[0].items()}


def train(cfg: DictConfig) -> float | None:
    """Prepare data, build the model, fit, then score the last and the best weights."""
    with _one_job_of_a_sweep():
        return _train(cfg)


def _train(cfg: DictConfig) -> float | None:
    log.info("Config:\n%s", to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    if cfg.get("pretrain_once"):
        _start_from_shared_pretraining(cfg)
    datamodule = instantiate(cfg.data, **_pretrained_tokenizer(cfg))
    datamodule.prepare_data()
    model_config = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    task = instantiate(
        cfg.task, _convert_="all", _recursive_=False, model_config=asdict(model_config),
        tokenizer=datamodule.tokenizer, data_config=OmegaConf.to_container(cfg.data, resolve=True),
        **datamodule.task_arguments(),
    )
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=_instantiate_all(cfg.get("callbacks"))
    )
    config_tree = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(flatten(config_tree) | {"model/params": task.model.num_params()})
        if isinstance(logger, WandbLogger):
            _define_wandb_summaries(logger, task)
    if trainer.is_global_zero:
        _save_run_files(run_dir, task)

    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    final = {}
    # The whole validation split: first the weights training ended with, then the best ones.
    for prefix, ckpt_path in (("val_last", None), ("val_full", best or None)):
        task.eval_prefix = prefix
        final |= _metrics(trainer.validate(task, dataloaders=datamodule.eval_dataloader("val"),
                                           ckpt_path=ckpt_path, verbose=False))
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a multirun starts a run of its own
    monitored = trainer.checkpoint_callback.best_model_score if best else None
    metric = cfg.optimized_metric
    results = {metric: None if monitored is None else float(monitored), **final}
    if trainer.is_global_zero:
        _report_training(task, results, metric, best, trainer.global_step, run_dir)
    return results.get(metric)


def _define_wandb_summaries(logger: WandbLogger, task: GPTTask) -> None:
    """W&B's run table shows each validation metric's best value (and its last), not the last.

    So the project page ranks and compares runs without any setup there.
    """
    for name in dict.fromkeys(("loss", *task.summary_metrics)):
        best = "min" if name in LOWER_IS_BETTER else "max"
        logger.experiment.define_metric(f"val/{name}", summary=f"{best},last")


@contextmanager
def _one_job_of_a_sweep() -> Iterator[None]:
    """Keep the jobs of a multirun, which share this process, apart under DDP.

    Lightning starts DDP ranks > 0 by re-running sys.argv with hydra.run.dir=<run.dir>: in a
    multirun that is the whole sweep, and not this job's folder. Point both at this job. It
    also leaves its process group and rank variables behind, which the next job would join.
    """
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, environ = sys.argv, dict(os.environ)
    sys.argv = [argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)


def _start_from_shared_pretraining(cfg: DictConfig) -> None:
    if cfg.task.get("init_from"):
        raise UserError(f"both task.init_from={cfg.task.init_from} and pretrain_once are set; "
                        f"drop one of them (pretrain_once=null to start from init_from)")
    job_overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    cfg.task.init_from = str(pretrain_once(cfg.pretrain_once, cfg.paths.log_dir, job_overrides))


def _pretrained_tokenizer(cfg: DictConfig) -> dict:
    """With task.init_from, the data is tokenized by the pretrained run's tokenizer."""
    init_from = cfg.task.get("init_from")
    if not init_from:
        return {}
    tokenizer = load_pretrained(init_from).tokenizer
    given = cfg.data.get("tokenizer")
    ready_made = isinstance(given, str) and given not in KINDS  # else a kind to train
    if ready_made and from_spec(given).to_str() != tokenizer.to_str():
        raise UserError(
            f"data.tokenizer={given} differs from the tokenizer of task.init_from="
            f"{init_from}; a pretrained model only works with its own tokenizer: drop "
            f"data.tokenizer or point it at the pretraining run's tokenizer.json"
        )
    return {"tokenizer": tokenizer}


def _save_run_files(run_dir: Path, task: GPTTask) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    task.tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / "model_config.json").write_text(json.dumps(task.hparams.model_config, indent=2))


def _report_training(task: GPTTask, results: dict, metric: str, best: str, steps: int,
                     run_dir: Path) -> None:
    summary = {"best_checkpoint": best or None, "steps": steps, **results}
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    parts = [f"{prefix}/{name} {results[f'{prefix}/{name}']:.4f}"
             for prefix in ("val_full", "val_last") for name in task.summary_metrics]
    lines = [f"{metric} {results[metric]:.4f} (best validation, selects the checkpoint)"
             if results[metric] is not None else f"{metric}: no validation ran",
             " | ".join(parts[: len(task.summary_metrics)]) + " (best checkpoint, whole val split)",
             " | ".join(parts[len(task.summary_metrics) :]) + " (last step, whole val split)"]
    print("\n" + "\n".join(lines) + f"\nrun folder: {run_dir}")


def _open_checkpoint(cfg: DictConfig) -> Checkpoint:
    path, run_dir = find_checkpoint(cfg.get("run"), cfg.get("ckpt"))
    return load_checkpoint(path, run_dir)


def _task_of(ckpt: Checkpoint, cfg: DictConfig) -> GPTTask:
    """The checkpoint's task, with the decoding beam of the command line if it gives one."""
    task = ckpt.task()
    if cfg.get("beam_size") and "beam_size" in task.hparams:
        task.hparams.beam_size = cfg.beam_size
    return task


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint on a split with its task's metrics; print and save a report."""
    ckpt = _open_checkpoint(cfg)
    task = _task_of(ckpt, cfg)
    data_cfg = cfg.data if cfg.get("data") else OmegaConf.create(ckpt.artifacts["data_config"])
    datamodule = instantiate(data_cfg, tokenizer=ckpt.tokenizer)
    split = cfg.split or task.default_eval_split
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], devices=1, strategy="auto",
        enable_checkpointing=False, enable_model_summary=False,
    )
    results = {}
    for prefix, loader in task.evaluation_passes(datamodule, split):
        task.eval_prefix = prefix
        results |= _metrics(trainer.validate(task, dataloaders=loader, verbose=False))
    print("\n" + task.report(results, split))
    out = _evaluation_file(ckpt, split)
    report = {"checkpoint": str(ckpt.path), "split": split, **results,
              **task.evaluation_details()}
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"written to {out}")
    return results


def _evaluation_file(ckpt: Checkpoint, split: str) -> Path:
    folder = ckpt.run_dir or ckpt.path.parent
    return folder / f"evaluation-{ckpt.path.stem}-{split}.json"


def generate(cfg: DictConfig) -> list[str]:
    """What a run is for: continue text (pretrain), label texts (classify), translate (seq2seq)."""
    ckpt = _open_checkpoint(cfg)
    device = torch.device(cfg.device if cfg.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    task_name = ckpt.artifacts["task"]
    if task_name == "pretrain":
        return _continue_text(cfg, ckpt, device)
    task = _task_of(ckpt, cfg).to(device)
    texts = _input_texts(cfg, task_name)
    if task_name == "classify":
        outputs = [_label_line(text, probs) for text, probs in zip(
            texts, task.classify(texts, cfg.batch_size), strict=True)]
    else:
        outputs = task.translate(texts, cfg.batch_size)
    if cfg.get("output_file"):
        Path(cfg.output_file).write_text("".join(line + "\n" for line in outputs),
                                         encoding="utf-8")
        print(f"{len(outputs)} lines written to {cfg.output_file}")
    else:
        print("\n".join(outputs))
    return outputs


def _input_texts(cfg: DictConfig, task_name: str) -> list[str]:
    if cfg.get("input_file"):
        path = Path(cfg.input_file)
        if not path.is_file():
            raise UserError(f"input_file {path} does not exist; give a text file, one input "
                            f"per line")
        return [line for line in read_text(path).splitlines() if line.strip()]
    if cfg.get("text"):
        return [cfg.text]
    raise UserError(f"this is a {task_name} run: pass text=\"...\" or input_file=<file with "
                    f"one text per line>")


def _label_line(text: str, probabilities: dict[str, float]) -> str:
    """`label<TAB>probability<TAB>text`: the most likely label first, easy to cut or sort."""
    label = max(probabilities, key=probabilities.get)
    return f"{label}\t{probabilities[label]:.4f}\t{text}"


def _continue_text(cfg: DictConfig, ckpt: Checkpoint, device: torch.device) -> list[str]:
    """Continue a prompt: num_samples samples, batched, with the model's KV cache."""
    tokenizer = ckpt.tokenizer
    model = ckpt.model().to(device)
    text = cfg.get("text") or cfg.prompt
    prompt = tokenizer.encode(text) if text else []
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
        samples += [text + tokenizer.decode(tokens) for tokens in outputs]
    for sample in samples:
        print(sample)
        print("-" * 40)
    return samples
