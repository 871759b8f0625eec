"""Classification fine-tuning: -sum_i log P(y_i | x_i), plus GPT-1's auxiliary LM loss.

The GPT reads `text <|endoftext|>`; a linear head maps the hidden state of that last real
token (GPT-1's extract token; `pooling=last`), the mean over the real tokens
(`pooling=mean`) or their feature-wise maximum (`pooling=max`, as in Kim's 2014 sentence
CNN) to class logits. With `aux_lm_weight` = lambda > 0 the loss adds
lambda * (next-token loss on the same inputs), as in GPT-1 (lambda = 0.5 there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from gptlab.data.finetune import encode_texts, pad
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.errors import UserError
from gptlab.tasks.base import GPTTask, lm_loss

POOLINGS = ("last", "mean", "max")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) right-padded hidden states -> (B, C), from real tokens only."""
    if how == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    real = torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]
    if how == "max":
        return hidden.masked_fill(~real[..., None], float("-inf")).amax(1)
    return (hidden * real[..., None]).sum(1) / lengths[:, None]


def pooled_shares(hidden: torch.Tensor, how: str) -> torch.Tensor:
    """(T, C) hidden states of one unpadded text -> (T,): each position's share of the pooled
    vector (the last one alone, all alike, or as many features as each supplies the max)."""
    length, width = hidden.shape
    if how == "last":
        return F.one_hot(torch.tensor(length - 1), length).to(hidden.dtype)
    if how == "max":
        return torch.bincount(hidden.argmax(0), minlength=length).to(hidden.dtype) / width
    return torch.full((length,), 1 / length, dtype=hidden.dtype)


class ClassificationTask(GPTTask):
    """A GPT with a classification head; logs val/loss, val/acc, val/f1 (macro), val/acc_best."""

    task_name = "classify"
    summary_metrics = ("acc", "f1")

    def __init__(self, model_config, optimizer: dict, scheduler: dict, labels: list[str],
                 pooling: str = "last", aux_lm_weight: float = 0.0, head_dropout: float = 0.1,
                 class_weights: list[float] | None = None, **kwargs):
        super().__init__(model_config, optimizer, scheduler, **kwargs)
        if pooling not in POOLINGS:
            raise UserError(f"task.pooling={pooling!r}; use one of: {', '.join(POOLINGS)}")
        if class_weights is not None and len(class_weights) != len(labels):
            raise UserError(f"task.class_weights has {len(class_weights)} values for "
                            f"{len(labels)} classes ({', '.join(labels)}); give one per class")
        self.labels = list(labels)
        n = len(labels)
        self.head = nn.Sequential(nn.Dropout(head_dropout),
                                  nn.Linear(self.model.config.n_embd, n))
        nn.init.normal_(self.head[1].weight, std=0.02)
        nn.init.zeros_(self.head[1].bias)
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float)
        self.register_buffer("class_weights", weights, persistent=False)
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.val_f1 = MulticlassF1Score(n, average="macro")
        self.val_confusion = MulticlassConfusionMatrix(n)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # a resumed run keeps its best so far
        self.confusion: torch.Tensor | None = None  # of the last evaluation, for reports

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        """Class logits (B, n_classes) and the GPT's hidden states (B, T, C)."""
        hidden = self.model(input_ids, return_hidden=True)
        return self.head(pool(hidden, lengths, self.hparams.pooling)), hidden

    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(total loss, class logits, the loss terms by name)."""
        logits, hidden = self(batch["input_ids"], batch["lengths"])
        cls_loss = F.cross_entropy(logits, batch["labels"], weight=self.class_weights)
        terms = {"cls_loss": cls_loss}
        loss = cls_loss
        if self.hparams.aux_lm_weight:
            terms["lm_loss"] = self.aux_lm_loss(hidden, batch["input_ids"], batch["lengths"])
            loss = cls_loss + self.hparams.aux_lm_weight * terms["lm_loss"]
        return loss, logits, terms

    def aux_lm_loss(self, hidden, input_ids, lengths) -> torch.Tensor:
        """Next-token loss on the inputs themselves (padding excluded)."""
        targets = input_ids[:, 1:].masked_fill(
            torch.arange(1, input_ids.size(1), device=input_ids.device)[None, :]
            >= lengths[:, None], IGNORE_INDEX)
        return lm_loss(self.model.lm_head(hidden[:, :-1]), targets)

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["lengths"].sum())

    def training_loss(self, batch: dict):
        loss, logits, terms = self.losses(batch)
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"acc": accuracy, **terms}

    def validation_step(self, batch: dict, batch_idx: int):
        _, logits, terms = self.losses(batch)
        self.val_loss.update(terms["cls_loss"], weight=len(logits))
        for metric in (self.val_acc, self.val_f1, self.val_confusion):
            metric.update(logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        p = self.eval_prefix
        acc = self.val_acc.compute()
        self.log_dict({f"{p}/loss": self.val_loss.compute(), f"{p}/acc": acc,
                       f"{p}/f1": self.val_f1.compute()}, prog_bar=p == "val")
        self.confusion = self.val_confusion.compute().cpu()
        for metric in (self.val_loss, self.val_acc, self.val_f1, self.val_confusion):
            metric.reset()
        if self.fitting_validation():
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute())
        self.log_progress()

    # -- inference (generate.py) ---------------------------------------------------------
    @torch.no_grad()
    def classify(self, texts: list[str], batch_size: int = 64) -> list[dict[str, float]]:
        """For each text, the probability of every label."""
        ids = encode_texts(self.tokenizer, texts, self.model.config.block_size)
        device = self.model.wte.weight.device
        probabilities = []
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            lengths = torch.tensor([len(r) for r in rows], device=device)
            logits, _ = self(pad(rows).to(device), lengths)
            probabilities += logits.softmax(-1).tolist()
        return [dict(zip(self.labels, p, strict=True)) for p in probabilities]

    # -- evaluate.py ---------------------------------------------------------------------
    def report(self, results: dict[str, float], split: str) -> str:
        """Accuracy and macro F1, per-class precision/recall/F1, and the confusion matrix."""
        cm = self.confusion.double()
        lines = [f"{split}: accuracy {results[f'{split}/acc']:.4f}, macro F1 "
                 f"{results[f'{split}/f1']:.4f}, loss {results[f'{split}/loss']:.4f} "
                 f"({int(cm.sum())} examples)", "",
                 f"{'class':<16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
        for i, label in enumerate(self.labels):
            tp, predicted, actual = cm[i, i], cm[:, i].sum(), cm[i].sum()
            precision = float(tp / predicted) if predicted else 0.0
            recall = float(tp / actual) if actual else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            lines.append(f"{label:<16} {precision:>9.4f} {recall:>7.4f} {f1:>7.4f} "
                         f"{int(actual):>8}")
        width = max(8, *(len(label) for label in self.labels))
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * 16 + "".join(f"{label:>{width + 1}}" for label in self.labels)]
        for i, label in enumerate(self.labels):
            lines.append(f"{label:<16}" + "".join(f"{int(n):>{width + 1}}" for n in cm[i]))
        return "\n".join(lines)

    def evaluation_details(self) -> dict:
        return {"labels": self.labels, "confusion_matrix": self.confusion.tolist()}
