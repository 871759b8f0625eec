"""The pretraining LightningModule: causal LM loss -sum_t log P(x_t | x_<t) over token windows."""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric

from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.tasks.base import GPTTask, lm_loss


class LanguageModelingTask(GPTTask):
    """Pretraining (or continued pretraining from `init_from`); logs train/*, val/* and speed."""

    task_name = "pretrain"
    summary_metrics = ("loss", "bpb")

    def __init__(self, model_config, optimizer: dict, scheduler: dict,
                 val_bytes_per_token: float = 1.0, **kwargs):
        super().__init__(model_config, optimizer, scheduler, **kwargs)
        self.val_bytes_per_token = val_bytes_per_token
        self.val_loss = MeanMetric()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def batch_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[1].numel()

    def training_loss(self, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return lm_loss(self.model(x), y), {}

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
            f"{p}/bpb": loss / math.log(2) / self.val_bytes_per_token,
        }, prog_bar=p == "val")
        self.log_progress()

    def final_eval_loader(self, datamodule, max_tokens: int | None):
        """Every window of the split, or evenly spaced ones up to max_tokens (large corpora)."""
        windows = None if max_tokens is None else max(1, max_tokens // datamodule.block_size)
        return self._scoped(datamodule.eval_dataloader("val", windows),
                            datamodule.eval_dataloader("val"), "windows")

    def artifacts(self) -> dict:
        return super().artifacts() | {"val_bytes_per_token": self.val_bytes_per_token}

    # -- evaluate.py ---------------------------------------------------------------------
    def evaluation_passes(self, datamodule, split: str) -> list[tuple[str, object]]:
        """The fixed windows that training logs, then every token of the split."""
        self.val_bytes_per_token = datamodule.bytes_per_token(split)
        return [(split, datamodule.eval_dataloader(split, datamodule.val_windows)),
                (f"{split}_full", datamodule.eval_dataloader(split))]

    def report(self, results: dict[str, float], split: str) -> str:
        rows = [(split, "fixed windows (as logged in training)"), (f"{split}_full", "whole split")]
        lines = [f"{'metrics':<10} {'loss':>8} {'ppl':>9} {'bpb':>7}  windows"]
        for prefix, what in rows:
            loss, ppl, bpb = (results[f"{prefix}/{m}"] for m in ("loss", "ppl", "bpb"))
            lines.append(f"{prefix:<10} {loss:>8.4f} {ppl:>9.3f} {bpb:>7.4f}  {what}")
        return "\n".join(lines)
