"""What every task shares: the GPT, its optimizer and schedule, training logs, checkpoints.

A task is a LightningModule around `models.gpt.GPT`. Subclasses say how a batch becomes a
loss (`training_step`), what validation measures, and what a checkpoint must carry for
evaluate.py and generate.py to rebuild them (`artifacts`). Fine-tuning starts from a
pretrained run through `init_from` (weights only; the optimizer starts fresh).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, fields

import lightning as L
import torch
import torch.nn.functional as F

from gptlab.checkpoints import CHECKPOINT_KEY, load_pretrained
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError
from gptlab.models import build_model
from gptlab.models.gpt import GPTConfig

# Fields that may differ between a pretrained model and the model it initialises.
_TRAINING_ONLY_FIELDS = {"dropout", "n_layer"}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_lr_ratio` at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0):
    """Mean next-token cross-entropy over the targets that are not IGNORE_INDEX."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


class GPTTask(L.LightningModule):
    """The GPT plus optimizer, schedule, throughput logging and checkpoint artifacts."""

    task_name = ""
    summary_metrics: tuple[str, ...] = ("loss",)  # printed at the end of training
    default_eval_split = "val"
    architectures: tuple[str, ...] = ("decoder_only",)  # the model.architecture it trains

    def __init__(
        self,
        model_config: dict | GPTConfig,
        optimizer: dict,
        scheduler: dict,
        compile: bool = False,
        init_from: str | None = None,
        transfer_layers: int | None = None,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        tokenizer: Tokenizer | None = None,
        data_config: dict | None = None,
    ):
        super().__init__()
        if isinstance(model_config, GPTConfig):
            model_config = asdict(model_config)
        self.save_hyperparameters(ignore=["tokenizer", "data_config"])
        config = GPTConfig(**model_config)
        if config.architecture not in self.architectures:
            raise UserError(f"task={self.task_name} trains {' or '.join(self.architectures)} "
                            f"models, not model.architecture={config.architecture}; use "
                            f"task=seq2seq or task=summarize for an encoder-decoder")
        self.model = build_model(config)
        if init_from:
            self._load_pretrained(init_from, transfer_layers)
        if freeze_backbone:
            self.model.requires_grad_(False)
        if compile:
            self.model.compile()
        self.tokenizer, self.data_config = tokenizer, data_config
        self.eval_prefix = "val"  # the pipeline's final passes log as val_last/* and val_full/*
        self.tokens_seen, self.elapsed_s = 0, 0.0
        self._step_clock: float | None = None
        self._last_logged_step = -1
        self._reset_window()

    # -- initialisation from a pretrained run -------------------------------------------
    def _load_pretrained(self, init_from: str, transfer_layers: int | None) -> None:
        """Copy a pretrained GPT's weights: all of them, or embeddings + the first k blocks."""
        pretrained = load_pretrained(init_from)
        # Through GPTConfig: configs saved before a field existed get its default.
        theirs = asdict(GPTConfig(**pretrained.artifacts["model_config"]))
        ours = asdict(self.model.config)
        if transfer_layers is not None and ours["architecture"] != "decoder_only":
            raise UserError("task.transfer_layers copies the first blocks of a decoder-only "
                            "model; leave it null for an encoder-decoder")
        k = theirs["n_layer"] if transfer_layers is None else transfer_layers
        differs = [f.name for f in fields(GPTConfig) if f.name not in _TRAINING_ONLY_FIELDS
                   and theirs.get(f.name) != ours[f.name]]
        if differs or not 0 <= k <= min(theirs["n_layer"], ours["n_layer"]) or (
                transfer_layers is None and theirs["n_layer"] != ours["n_layer"]):
            shape = ", ".join(f"{name}={theirs.get(name)}" for name in
                              ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"))
            raise UserError(
                f"task.init_from={init_from} holds a model of another shape ({shape}; differs "
                f"in {', '.join(differs) or 'n_layer'}); choose the model= size it was "
                f"pretrained with, or task.transfer_layers <= its n_layer"
            )
        weights = {name: w for name, w in pretrained.weights().items()
                   if not name.startswith("blocks.") or int(name.split(".")[1]) < k}
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or any(not name.startswith("blocks.") for name in missing):
            raise UserError(f"task.init_from={init_from}: weights do not fit the model "
                            f"(unexpected {unexpected[:3]}, missing {missing[:3]})")

    # -- training ------------------------------------------------------------------------
    def batch_tokens(self, batch) -> int:
        """Tokens in a batch, for throughput; subclasses count their real (unpadded) tokens."""
        raise NotImplementedError

    def record(self, **losses: torch.Tensor) -> None:
        """Add this step's losses to the running means reported every log_every_n_steps."""
        for name, value in losses.items():
            self._window_sums[name] = self._window_sums.get(name, 0.0) + value.detach()
        self._window_batches += 1

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter() - self.elapsed_s  # elapsed_s survives a resume
        self._step_clock = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Every log_every_n_steps: losses, LR, tokens seen, wall time and throughput.

        Sent to the loggers directly: Lightning's self.log costs about a millisecond per call,
        which at nanoGPT's CPU shape would be several percent of a training step.
        """
        now = time.perf_counter()
        tokens = self.batch_tokens(batch) * self.trainer.world_size
        self.tokens_seen += tokens
        if self._step_clock is not None:
            self._window_time += now - self._step_clock
            self._window_tokens += tokens
        self._step_clock = now
        self.elapsed_s = now - self._fit_started
        step = self.trainer.global_step
        if step % self.trainer.log_every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        # Means over the steps since the last report.
        metrics = {f"train/{name}": float(total / self._window_batches)
                   for name, total in self._window_sums.items()}
        metrics |= {
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens": self.tokens_seen,
            "train/elapsed_s": self.elapsed_s,
        }
        if self._window_time > 0:
            metrics["train/tokens_per_s"] = self._window_tokens / self._window_time
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        self.log("train/loss", metrics["train/loss"], prog_bar=True, logger=False)
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_sums: dict[str, torch.Tensor | float] = {}
        self._window_batches = 0
        self._window_time, self._window_tokens = 0.0, 0

    def on_validation_end(self) -> None:
        self._step_clock = None  # the next step's time would include this validation

    def log_progress(self) -> None:
        """Tokens and time beside each val metric, so time-to-metric reads off one CSV row."""
        if self.eval_prefix == "val" and self.trainer.state.fn == "fit":
            self.log_dict({"val/tokens": float(self.tokens_seen), "val/elapsed_s": self.elapsed_s})

    def configure_optimizers(self):
        """AdamW without decay on biases and norms; the backbone's LR scaled by its own factor."""
        opt = dict(self.hparams.optimizer)
        weight_decay = opt.pop("weight_decay", 0.0)
        lr = opt.pop("lr")
        backbone = {id(p) for p in self.model.parameters()}
        groups = []
        for params, scale in (
            ([p for p in self.parameters() if id(p) in backbone], self.hparams.backbone_lr_scale),
            ([p for p in self.parameters() if id(p) not in backbone], 1.0),
        ):
            params = [p for p in params if p.requires_grad]
            groups += [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay,
                 "lr": lr * scale},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0,
                 "lr": lr * scale},
            ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **opt)
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(optimizer)}

    def _scheduler(self, optimizer):
        s = self.hparams.scheduler
        total = s.get("total_steps") or self.trainer.max_steps
        if total is None or total <= 0:
            raise UserError(
                "the LR schedule needs a step budget: set trainer.max_steps (or "
                "task.scheduler.total_steps) to a positive number"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, s["warmup_steps"], total, s["min_lr_ratio"]),
        )
        return {"scheduler": schedule, "interval": "step"}

    # -- checkpoints ---------------------------------------------------------------------
    def artifacts(self) -> dict:
        """What evaluate.py and generate.py need besides the weights and hyperparameters."""
        return {
            "task": self.task_name,
            "model_config": dict(self.hparams.model_config),
            "tokenizer": self.tokenizer.to_str() if self.tokenizer else None,
            "data_config": self.data_config,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.artifacts()
        checkpoint[CHECKPOINT_KEY]["progress"] = {
            "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_s,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        progress = checkpoint.get(CHECKPOINT_KEY, {}).get("progress", {})
        self.tokens_seen = progress.get("tokens_seen", 0)
        self.elapsed_s = progress.get("elapsed_s", 0.0)

    # -- evaluation reports (evaluate.py) -------------------------------------------------
    def evaluation_passes(self, datamodule, split: str) -> list[tuple[str, object]]:
        """(metric prefix, dataloader) pairs that evaluate.py runs for `split`."""
        return [(split, datamodule.eval_dataloader(split))]

    def evaluation_details(self) -> dict:
        """Non-scalar results of the last evaluation, saved beside the metrics."""
        return {}

    def report(self, results: dict[str, float], split: str) -> str:
        """The table evaluate.py prints."""
        return "\n".join(f"{name:<24} {value:.4f}" for name, value in results.items())
