"""What the entry points do: train(cfg), evaluate(cfg), generate(cfg).

Each takes the composed Hydra config, builds the objects it names (`_target_`) and runs
them. train() returns the metric a Hydra sweeper optimises (cfg.optimized_metric).
"""

from __future__ import annotations

import itertools
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
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.seed import isolate_rng
from omegaconf import DictConfig, OmegaConf, read_write
from tqdm import tqdm

from gptlab import hardware
from gptlab.callbacks import Preempted
from gptlab.chat import CannedResponses, Chat
from gptlab.checkpoints import (
    LAST,
    Checkpoint,
    find_checkpoint,
    load_checkpoint,
    load_pretrained,
)
from gptlab.data.dialogue import render_turn
from gptlab.data.sources import read_text
from gptlab.data.tokenizers import KINDS, Tokenizer, from_spec
from gptlab.errors import UserError
from gptlab.pretrain_once import pretrain_once
from gptlab.resume import (
    check_same_training,
    read_metric_rows,
    run_config,
    wandb_run_id,
    write_metric_rows,
)
from gptlab.safety import SafetyFilter
from gptlab.tasks.base import GPTTask, NonFiniteLoss
from gptlab.utils.config import flatten, to_yaml
from gptlab.utils.files import write_atomic

log = logging.getLogger("gptlab")

LOWER_IS_BETTER = ("loss", "ppl", "bpb")  # validation metrics; all others are better higher
CORPUS_TARGET = "gptlab.data.lm_datamodule.LMDataModule"
# precision auto times this many training batches: variable-length data (fine-tuning) gives
# batches of other lengths, and one short batch once made bf16 look slower than fp32
TIMED_BATCHES = 4


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
    run_dir = Path(cfg.paths.output_dir)
    resume = _checkpoint_to_resume(cfg, run_dir)
    log.info("Config:\n%s", to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True)

    if cfg.get("pretrain_once"):
        _start_from_shared_pretraining(cfg)
    datamodule = instantiate(cfg.data, **_pretrained_tokenizer(cfg, resume))
    datamodule.prepare_data()
    if resume is not None:
        _check_same_tokenizer(datamodule.tokenizer, resume)
    model_config = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    task: GPTTask = instantiate(
        cfg.task, _convert_="all", _recursive_=False, model_config=asdict(model_config),
        tokenizer=datamodule.tokenizer, data_config=OmegaConf.to_container(cfg.data, resolve=True),
        run_config=run_config(cfg), **datamodule.task_arguments(),
        **({"init_from": None} if resume is not None else {}),  # the checkpoint has the weights
    )
    hardware.set_matmul_precision(cfg.get("float32_matmul_precision"), cfg.trainer.accelerator)
    precision = _precision(cfg, task, datamodule, resume)
    loggers = _loggers(cfg, run_dir, resume)
    trainer: L.Trainer = instantiate(
        cfg.trainer, precision=precision, logger=loggers or False,
        callbacks=_instantiate_all(cfg.get("callbacks")),
    )
    if resume is None:
        for logger in loggers:
            params = {"model/params": task.model.num_params()}
            logger.log_hyperparams(flatten(run_config(cfg)) | params)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _define_wandb_summaries(logger, task)
    if trainer.is_global_zero:
        _save_run_files(run_dir, task)
        _record_machine(run_dir, hardware.machine(cfg.trainer.accelerator, precision,
                                                  trainer.world_size))

    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=resume and resume.path,
                    weights_only=True)
    except Preempted as stop:
        _stop_preempted(stop, run_dir, trainer)
    except NonFiniteLoss as err:
        raise UserError(f"{err}; {_last_good_checkpoint(run_dir)}") from err

    results = _final_scores(cfg, trainer, task, datamodule)
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a multirun starts a run of its own
    if trainer.is_global_zero:
        _report_training(task, results, cfg.optimized_metric, run_dir)
    return results.get(cfg.optimized_metric)


def _checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> Checkpoint | None:
    """What this run continues from: ckpt_path, else its own folder's last.ckpt (resume=...
    points the run at its folder; a requeued job lands in it by itself)."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist; pass a checkpoint file, "
                            f"or resume=<run folder> to continue a run in its own folder")
    else:
        path = run_dir / "checkpoints" / LAST
        if not path.is_file():
            if cfg.get("resume"):
                raise UserError(f"resume: {run_dir} has no checkpoints/{LAST} to continue from "
                                f"(it stopped before its first checkpoint); start a new run")
            return None
    checkpoint = load_checkpoint(path)
    check_same_training(run_config(cfg), checkpoint)
    log.info("Continuing the run in %s from %s (step %d)", run_dir, path, checkpoint.step)
    return checkpoint


def _check_same_tokenizer(tokenizer: Tokenizer, resume: Checkpoint) -> None:
    if tokenizer.to_str() != resume.artifacts["tokenizer"]:
        raise UserError(f"the data now gives another tokenizer than the one {resume.path} was "
                        f"trained with: the data changed since; a resume needs the same data")


def _precision(cfg: DictConfig, task: GPTTask, datamodule, resume: Checkpoint | None) -> str:
    """The configured precision, or for `auto` the one this machine runs this model best in:
    where that takes a timing (a CPU with native bf16), the one a resumed run trained in, else
    the one measured for this model on this machine, once."""
    requested, accelerator = cfg.trainer.get("precision", "32-true"), cfg.trainer.accelerator
    timed = (str(requested) == hardware.AUTO and not hardware.on_gpu(accelerator)
             and hardware.cpu_bf16_feature())
    if not timed:
        precision, why = hardware.resolve_precision(requested, accelerator)
    elif resume is not None and (trained_in := _trained_precision(resume)):
        precision, why = trained_in, f"the run trained in it before this resume ({resume.path})"
    else:
        precision, why = _measured_precision(cfg, task, datamodule)
    if str(requested) == hardware.AUTO and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"precision: {precision} ({why})", flush=True)
    return precision


def _measured_precision(cfg: DictConfig, task: GPTTask, datamodule) -> tuple[str, str]:
    """fp32 or bf16, whichever the first training batches take less time in, measured once
    per machine, model and data (hardware.remembered_choice). The key leaves out the seed
    and the batches' shapes: the seeds of a sweep draw batches of other lengths, and must
    still train in one arithmetic."""
    data = cfg.get("data") or {}
    key = {"machine": hardware.machine(cfg.trainer.accelerator, hardware.AUTO),
           "task": type(task).__name__, "model": task.hparams.model_config,
           "data": {"name": data.get("name"), "batch_size": data.get("batch_size")}}

    def measure() -> tuple[str, str]:  # reads batches only when no earlier run measured
        with isolate_rng():
            batches = list(itertools.islice(datamodule.train_dataloader(), TIMED_BATCHES))
        steps = [lambda batch=batch: task.training_loss(batch)[0] for batch in batches]
        timer = hardware.step_timer(task, steps)
        return hardware.resolve_precision(hardware.AUTO, cfg.trainer.accelerator, timer)

    return hardware.remembered_choice(cfg.paths.cache_dir, key, measure)


def _trained_precision(resume: Checkpoint) -> str | None:
    """The CPU precision the checkpoint's run last trained in (its machine.json), if any."""
    machines = hardware.recorded_machines(resume.run_dir) if resume.run_dir else []
    last = machines[-1].get("precision") if machines else None
    return last if last in ("32-true", "bf16-mixed") else None


def _loggers(cfg: DictConfig, run_dir: Path, resume: Checkpoint | None) -> list:
    """The configured loggers; a resumed run continues its W&B run and its metrics.csv."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node or "_target_" not in node:
            continue
        extra = {}
        if resume is not None and node._target_.endswith("WandbLogger"):
            run_id = wandb_run_id(run_dir)
            extra = {"id": run_id, "resume": "allow"} if run_id else {}
        loggers.append(instantiate(node, **extra))
    if resume is not None:
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                _keep_metric_rows(logger, resume.step)
    return loggers


def _keep_metric_rows(logger: CSVLogger, step: int) -> None:
    """Lightning's CSV writer deletes an existing metrics.csv; keep the rows up to `step`."""
    path = Path(logger.log_dir) / "metrics.csv"
    header, rows = read_metric_rows(path, step)
    writer = logger.experiment  # created now: it removes the file
    if header:
        write_metric_rows(path, header, rows)
        writer.metrics_keys = sorted(header)


def _stop_preempted(stop: Preempted, run_dir: Path, trainer: L.Trainer) -> None:
    if trainer.is_global_zero:
        print(f"stopped: {stop}; saved {stop.checkpoint}. Continue with: python train.py "
              f"resume={run_dir}", file=sys.stderr, flush=True)
        stop.requeue()
    sys.exit(stop.exit_code)


def _last_good_checkpoint(run_dir: Path) -> str:
    last = run_dir / "checkpoints" / LAST
    if not last.is_file():
        return "no checkpoint was written before it"
    return f"the last good checkpoint is {last} (step {load_checkpoint(last).step})"


def _final_scores(cfg: DictConfig, trainer: L.Trainer, task: GPTTask, datamodule) -> dict:
    """The validation split scored with the last weights (val_last/*) and the best (val_full/*).

    Once when the last weights are the best. trainer.limit_val_batches limits the periodic
    validations only; final_eval_tokens caps these passes on large corpora (LM tasks).
    """
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    monitored = trainer.checkpoint_callback.best_model_score if best else None
    loader = task.final_eval_loader(datamodule, cfg.get("final_eval_tokens"))
    trainer.limit_val_batches = 1.0
    task.eval_prefix = "val_last"
    results = _metrics(trainer.validate(task, dataloaders=loader, verbose=False))
    if best and load_checkpoint(Path(best)).step != trainer.global_step:
        task.eval_prefix = "val_full"
        results |= _metrics(trainer.validate(task, dataloaders=loader, ckpt_path=best,
                                             verbose=False, weights_only=True))
    else:  # the best checkpoint holds the last weights: same scores
        same = {name.replace("val_last/", "val_full/"): value for name, value in results.items()}
        for logger in trainer.loggers:
            logger.log_metrics(same, step=trainer.global_step)
        results |= same
    metric = cfg.optimized_metric
    return {metric: None if monitored is None else float(monitored), **results,
            "best_checkpoint": best or None, "steps": trainer.global_step}


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


def _pretrained_tokenizer(cfg: DictConfig, resume: Checkpoint | None = None) -> dict:
    """With task.init_from, the data is tokenized by the pretrained run's tokenizer."""
    init_from = cfg.task.get("init_from")
    if not init_from:
        return {}
    if resume is not None:  # the pretrained run may be gone; its tokenizer travels on
        return {"tokenizer": resume.tokenizer}
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
    write_atomic(run_dir / "tokenizer.json", task.tokenizer.to_str())
    write_atomic(run_dir / "model_config.json", json.dumps(task.hparams.model_config, indent=2))


def _record_machine(run_dir: Path, info: dict) -> None:
    """Add the machine this run trains on to machine.json (a list: a resumed run may move)."""
    info = info | {"description": hardware.describe_machine(info)}
    print(f"machine: {info['description']}", flush=True)
    machines = hardware.recorded_machines(run_dir)
    if info not in machines:
        write_atomic(run_dir / "machine.json", json.dumps(machines + [info], indent=2) + "\n")


def _report_training(task: GPTTask, results: dict, metric: str, run_dir: Path) -> None:
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    parts = [f"{prefix}/{name} {results[f'{prefix}/{name}']:.4f}"
             for prefix in ("val_full", "val_last") for name in task.summary_metrics]
    scope = task.final_eval_scope()
    lines = [f"{metric} {results[metric]:.4f} (best validation, selects the checkpoint)"
             if results[metric] is not None else f"{metric}: no validation ran",
             " | ".join(parts[: len(task.summary_metrics)]) + f" (best checkpoint, {scope})",
             " | ".join(parts[len(task.summary_metrics) :]) + f" (last step, {scope})"]
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


def _local_paths(cfg: DictConfig) -> dict[str, str]:
    return {"cache_dir": cfg.paths.cache_dir, "download_dir": f"{cfg.paths.data_dir}/downloads"}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint on a split with its task's metrics; print and save a report."""
    ckpt = _open_checkpoint(cfg)
    task = _task_of(ckpt, cfg)
    _use_reranker(task, cfg, torch.device("cpu"))
    datamodule = _evaluation_data(cfg, ckpt)
    split = cfg.split or task.default_eval_split
    precision, _ = hardware.resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    trainer: L.Trainer = instantiate(
        cfg.trainer, precision=precision, logger=False, callbacks=[], devices=1,
        strategy="auto", enable_checkpointing=False, enable_model_summary=False,
    )
    results = {}
    for prefix, loader in task.evaluation_passes(datamodule, split):
        task.eval_prefix = prefix
        results |= _metrics(trainer.validate(task, dataloaders=loader, verbose=False))
    machine = hardware.describe_machine(hardware.machine(cfg.trainer.accelerator, precision))
    print("\n" + task.report(results, split) + f"\nmachine: {machine}")
    out = _evaluation_file(ckpt, split, _report_variant(cfg, task))
    report = {"checkpoint": str(ckpt.path), "split": split, "machine": machine, **results,
              **task.evaluation_details()}
    write_atomic(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"written to {out}")
    for name, png in task.evaluation_figures().items():
        picture = out.with_name(f"{out.stem}-{name}.png")
        write_atomic(picture, png)
        print(f"written to {picture}")
    return results


def _evaluation_data(cfg: DictConfig, ckpt: Checkpoint):
    """The data to score on, tokenized by the checkpoint's tokenizer.

    A corpus of the run itself is asked for with the run's own tokenizer spec first: that
    finds the prepared cache (a tokenizer object would key a new one, and preparing a large
    corpus again takes long); it is used only if its tokenizer is the checkpoint's.
    """
    if cfg.get("data"):
        return instantiate(cfg.data, tokenizer=ckpt.tokenizer)
    data_cfg = OmegaConf.create(ckpt.data_config(_local_paths(cfg)))
    if data_cfg.get("_target_") == CORPUS_TARGET:
        datamodule = instantiate(data_cfg)
        if datamodule.tokenizer.to_str() == ckpt.artifacts["tokenizer"]:
            return datamodule
    return instantiate(data_cfg, tokenizer=ckpt.tokenizer)


def _evaluation_file(ckpt: Checkpoint, split: str, variant: str = "") -> Path:
    folder = ckpt.run_dir or ckpt.path.parent
    return folder / f"evaluation-{ckpt.path.stem}-{split}{variant}.json"


def _report_variant(cfg: DictConfig, task: GPTTask) -> str:
    """What sets a report apart from the run's default evaluation, for its file name, so that
    evaluating on other data, with another beam or best-of-n keeps the earlier reports: ''
    for the default, else e.g. '-beam1' or '-best_of_4-t0.3-<reward run folder name>'."""
    parts = []
    if cfg.get("data"):
        parts.append(f"data_{cfg.data.get('name', 'other')}")
    if cfg.get("beam_size") and "beam_size" in task.hparams:
        parts.append(f"beam{cfg.beam_size}")
    if cfg.get("rerank"):
        parts.append(f"best_of_{cfg.num_candidates}-t{cfg.temperature:g}-"
                     f"{Path(str(cfg.rerank)).name}")
    return "".join(f"-{part}" for part in parts)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device; use auto, cpu, cuda or cuda:<index>") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}, but this machine has no CUDA GPU that torch can use; "
                        f"use device=cpu (or device=auto)")
    return device


def generate(cfg: DictConfig) -> list[str]:
    """What a run is for: continue text (pretrain), label texts (classify), translate (seq2seq)."""
    device = _device(cfg.device)
    if cfg.get("output_file") and not Path(cfg.output_file).expanduser().parent.is_dir():
        raise UserError(f"output_file={cfg.output_file}: its folder does not exist; create it "
                        f"or choose another path")
    ckpt = _open_checkpoint(cfg)
    task_name = ckpt.artifacts["task"]
    safety = SafetyFilter.from_config(cfg.get("safety"), device)
    if safety is not None and task_name == "classify":
        raise UserError("safety.* checks generated text, and a classify run generates none "
                        "(it labels texts); drop the safety options for this run")
    if cfg.get("chat") != (task_name == "agent"):
        raise UserError("chat=true talks to an agent run (task=agent); use it with one and only "
                        "with one" if cfg.get("chat") else "this is an agent run: talk to it with "
                        "chat=true (type as the customer, or pipe the customer's lines)")
    if task_name == "reward":
        raise UserError("a reward run scores an agent's candidate turns: pass it as "
                        "rerank=<reward run> (with num_candidates=4) beside an agent run")
    if task_name == "pretrain":
        return _continue_text(cfg, ckpt, device, safety)
    task = _task_of(ckpt, cfg).to(device)
    if task_name == "agent":
        return _chat(cfg, task, device, safety)
    texts = _input_texts(cfg, task_name)
    if task_name == "classify":
        outputs = [_label_line(text, probs) for text, probs in zip(
            texts, task.classify(texts, cfg.batch_size), strict=True)]
    else:
        processors = safety.processors(task.tokenizer) if safety else []
        outputs = task.translate(texts, cfg.batch_size, processors=processors)
        if safety is not None:
            outputs = safety.apply_all(outputs)
    if cfg.get("output_file"):
        write_atomic(Path(cfg.output_file).expanduser(), "".join(line + "\n" for line in outputs))
        print(f"{len(outputs)} lines written to {cfg.output_file}")
    else:
        print("\n".join(outputs))
    return outputs


def _use_reranker(task: GPTTask, cfg: DictConfig, device: torch.device) -> bool:
    """Best-of-n for an agent run: sample num_candidates turns, keep the one that the reward
    run `rerank` scores highest. Whether it is asked for."""
    n, rerank = cfg.get("num_candidates") or 1, cfg.get("rerank")
    if n == 1 and not rerank:
        return False
    if not rerank or n < 2 or task.task_name != "agent":
        raise UserError("best-of-n needs an agent run, num_candidates >= 2 and rerank=<reward "
                        f"run> (got num_candidates={n}, rerank={rerank})")
    reward_ckpt = load_checkpoint(*find_checkpoint(run=rerank))
    if reward_ckpt.artifacts["task"] != "reward":
        raise UserError(f"rerank={rerank} is a {reward_ckpt.artifacts['task']} run; give a "
                        f"reward run (task=reward)")
    reward = reward_ckpt.task().to(device)

    def reranker(contexts: list[str], candidates: list[str]) -> list[float]:
        reward.to(task.device)  # evaluate.py's trainer may have moved the agent
        return reward.score(contexts, candidates)

    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    task.use_reranker(reranker, n, sampling, cfg.seed)
    return True


def _chat(cfg: DictConfig, task: GPTTask, device: torch.device,
          safety: SafetyFilter | None) -> list[str]:
    """A conversation with an agent run on standard input (see gptlab.chat); the safety
    filter steers the agent's decoding and checks its text replies."""
    best_of = _use_reranker(task, cfg, device)
    if safety is not None:
        task.extra_processors = safety.processors(task.tokenizer)
    chat = Chat(task, CannedResponses(cfg.get("responses")), iter(sys.stdin),
                interactive=sys.stdin.isatty(), best_of=best_of, max_calls=cfg.max_calls,
                postprocess=[safety.apply] if safety else None)
    turns = chat.run()
    if cfg.get("output_file"):
        write_atomic(Path(cfg.output_file).expanduser(),
                     json.dumps([turn.as_dict() for turn in turns], indent=2,
                                ensure_ascii=False) + "\n")
        print(f"the conversation ({len(turns)} turns) written to {cfg.output_file}")
    return [render_turn(turn) for turn in turns]


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


def _continue_text(cfg: DictConfig, ckpt: Checkpoint, device: torch.device,
                   safety: SafetyFilter | None) -> list[str]:
    """Continue a prompt: num_samples samples, batched, with the model's KV cache; with a
    safety filter, steered away from its words and checked as printed (prompt included)."""
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
    processors = safety.processors(tokenizer) if safety else []
    samples: list[str] = []
    batches = range(0, cfg.num_samples, cfg.batch_size)
    for start in tqdm(batches, desc="generating", disable=len(batches) < 2):
        n = min(cfg.batch_size, cfg.num_samples - start)
        outputs = model.generate(
            [prompt] * n, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
            top_p=cfg.top_p, stop_token=stop, generator=generator, processors=processors,
        )
        samples += [text + tokenizer.decode(tokens) for tokens in outputs]
    if safety is not None:
        samples = safety.apply_all(samples)
    for sample in samples:
        print(sample)
        print("-" * 40)
    return samples
