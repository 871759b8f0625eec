"""The pretraining LightningModule: causal LM loss -sum_t log P(x_t | x_<t) over token windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError
from gptlab.models.gpt import GPT, GPTConfig

CHECKPOINT_KEY = "gptlab"  # what a checkpoint carries besides the weights (see `artifacts`)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_lr_ratio` at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not IGNORE_INDEX."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


class LanguageModelingTask(L.LightningModule):
    """Wraps `GPT` for pretraining; logs train/*, val/* and throughput."""

    task_name = "pretrain"

    def __init__(
        self,
        model_config: dict | GPTConfig,
        optimizer: dict,
        scheduler: dict,
        compile: bool = False,
        tokenizer: Tokenizer | None = None,
        val_bytes_per_token: float = 1.0,
        data_config: dict | None = None,
    ):
        super().__init__()
        if isinstance(model_config, GPTConfig):
            model_config = asdict(model_config)
        self.save_hyperparameters(ignore=["tokenizer", "data_config"])
        self.model = GPT(GPTConfig(**model_config))
        if compile:
            self.model.compile()
        self.tokenizer, self.data_config = tokenizer, data_config
        self.val_loss = MeanMetric()
        self.eval_prefix = "val"  # the pipeline's final whole-split pass logs as val_full/*
        self.tokens_seen, self.elapsed_s = 0, 0.0
        self._step_clock: float | None = None
        self._last_logged_step = -1
        self._reset_window()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = lm_loss(self.model(x), y)
        self._window_loss += loss.detach()
        self._window_batches += 1
        return loss

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter() - self.elapsed_s  # elapsed_s survives a resume
        self._step_clock = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Every log_every_n_steps: loss, LR, tokens seen, wall time and training throughput.

        Sent to the loggers directly: Lightning's self.log costs about a millisecond per call,
        which at nanoGPT's CPU shape would be several percent of a training step.
        """
        now = time.perf_counter()
        tokens = batch[1].numel() * self.trainer.world_size
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
        train_loss = float(self._window_loss / self._window_batches)
        metrics = {
            "train/loss": train_loss,  # mean over the steps since the last report
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens": self.tokens_seen,
            "train/elapsed_s": self.elapsed_s,
        }
        if self._window_time > 0:
            metrics["train/tokens_per_s"] = self._window_tokens / self._window_time
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        self.log("train/loss", train_loss, prog_bar=True, logger=False)
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_loss, self._window_batches = 0.0, 0  # loss: a tensor once added to
        self._window_time, self._window_tokens = 0.0, 0

    def on_validation_end(self) -> None:
        self._step_clock = None  # the next step's time would include this validation

    def configure_optimizers(self):
        opt = dict(self.hparams.optimizer)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": opt.pop("weight_decay", 0.0)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, **opt)
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

    # -- evaluation ----------------------------------------------------------------------
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        n_targets = (y != IGNORE_INDEX).sum()
        self.val_loss.update(lm_loss(self.model(x), y), weight=n_targets)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        p = self.eval_prefix
        self.log_dict({
            f"{p}/loss": loss,
            f"{p}/ppl": torch.exp(loss),
            f"{p}/bpb": loss / math.log(2) / self.hparams.val_bytes_per_token,
        }, prog_bar=p == "val")
        if p == "val" and self.trainer.state.fn == "fit":
            # Beside each val/loss, so time-to-loss and tokens-to-loss read off one CSV row.
            self.log_dict({"val/tokens": float(self.tokens_seen), "val/elapsed_s": self.elapsed_s})

    # -- checkpoints ---------------------------------------------------------------------
    def artifacts(self) -> dict:
        """What evaluate.py and generate.py need besides the weights."""
        return {
            "task": self.task_name,
            "model_config": dict(self.hparams.model_config),
            "tokenizer": self.tokenizer.to_str() if self.tokenizer else None,
            "data_config": self.data_config,
            "val_bytes_per_token": self.hparams.val_bytes_per_token,
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
