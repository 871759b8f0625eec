"""The reward model: a GPT with a scalar head that scores a candidate agent turn in its context.

The GPT reads the rendered history then the candidate turn (data/dialogue.py, `scored_input`);
a linear head maps the hidden state of its last token (`pooling=last`, the candidate's
`<|end|>`) or the mean over its tokens to one logit s, and P(good) = sigmoid(s). Loss: binary
cross-entropy. Good turns outnumber bad ones about 6 to 1 in Taskmaster-4, so by default
(`balance`) each class weighs n / (2 n_class): both classes count equally, and the 0.5
threshold of P(good) is the one that balanced accuracy asks for (the weights shift the
probabilities, which the calibration plot shows).

Validation logs `auc` (ROC AUC, threshold-free), `balanced_acc` (the mean of the recall of
good and of bad turns at P(good) = 0.5), `acc` and the weighted `loss`; evaluate.py adds a
calibration plot (the share of good turns against the predicted P(good), in ten bins) and the
expected calibration error. `score(contexts, candidates)` scores rendered turns for best-of-n
reranking (tasks/agent.py).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.functional.classification import binary_auroc

from gptlab.data.dialogue import check_markers, scored_input, split_rendered
from gptlab.data.finetune import pad
from gptlab.errors import UserError
from gptlab.tasks.base import GPTTask
from gptlab.tasks.classification import POOLINGS, pool

CALIBRATION_BINS = 10


def balanced_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall of the two classes at P(good) > 0.5 (0.5 for a class with no example)."""
    predicted = probabilities > 0.5
    recalls = [float((predicted[labels == c] == c).mean()) if (labels == c).any() else 0.5
               for c in (0, 1)]
    return sum(recalls) / 2


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray,
                     bins: int = CALIBRATION_BINS) -> list[dict]:
    """Per bin of predicted P(good) (equal widths): its count, mean prediction and share good."""
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": int((which == b).sum()),
             "mean_predicted": float(probabilities[which == b].mean()) if (which == b).any()
             else None,
             "fraction_good": float(labels[which == b].mean()) if (which == b).any() else None}
            for b in range(bins)]


def expected_calibration_error(bins: list[dict]) -> float:
    total = sum(b["count"] for b in bins)
    return sum(b["count"] * abs(b["mean_predicted"] - b["fraction_good"])
               for b in bins if b["count"]) / max(1, total)


def calibration_png(probabilities: np.ndarray, labels: np.ndarray, title: str) -> bytes:
    """Reliability diagram beside the histograms of P(good) for good and bad turns."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    bins = calibration_bins(probabilities, labels)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    left.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    used = [b for b in bins if b["count"]]
    left.plot([b["mean_predicted"] for b in used], [b["fraction_good"] for b in used],
              marker="o", label="model")
    for b in used:
        left.annotate(str(b["count"]), (b["mean_predicted"], b["fraction_good"]),
                      textcoords="offset points", xytext=(4, -10), fontsize=7)
    left.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(good)", ylabel="share of good turns",
             title=f"calibration (ECE {expected_calibration_error(bins):.3f}; n per bin)")
    left.legend(loc="upper left")
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    for label, name in ((1, "good"), (0, "bad")):
        right.hist(probabilities[labels == label], bins=edges, alpha=0.6, label=name)
    right.set(xlabel="predicted P(good)", ylabel="turns", title="predictions by true class")
    right.legend()
    fig.suptitle(title)
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=120)
    plt.close(fig)
    return data.getvalue()


class RewardTask(GPTTask):
    """A GPT with a scalar head; logs val/auc, val/balanced_acc, val/acc, val/loss."""

    task_name = "reward"
    summary_metrics = ("auc", "balanced_acc", "loss")
    primary_metric = "auc"  # val/<this>_best is logged during training
    default_eval_split = "test"

    def __init__(self, model_config, optimizer: dict, scheduler: dict,
                 class_counts: list[int] | None = None, balance: bool = True,
                 pooling: str = "last", head_dropout: float = 0.1, **kwargs):
        super().__init__(model_config, optimizer, scheduler, **kwargs)
        if pooling not in POOLINGS:
            raise UserError(f"task.pooling={pooling!r}; use one of: {', '.join(POOLINGS)}")
        if self.tokenizer is None:
            raise UserError("task=reward needs the tokenizer of its data (data=taskmaster4_reward)")
        check_markers(self.tokenizer, "this run")
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(self.model.config.n_embd, 1))
        nn.init.normal_(self.head[1].weight, std=0.02)
        nn.init.zeros_(self.head[1].bias)
        weights = [1.0, 1.0]
        if balance and class_counts and min(class_counts) > 0:
            weights = [sum(class_counts) / (2 * n) for n in class_counts]  # [bad, good]
        self.register_buffer("class_weights", torch.tensor(weights), persistent=False)
        self.val_auc_best = MaxMetric()
        self.val_auc_best.persistent(True)  # a resumed run keeps its best so far
        self.collected: list[tuple[int, float, float]] = []  # (index, P(good), label)
        self.last: tuple[np.ndarray, np.ndarray] | None = None  # of the last evaluation

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One logit per row: log-odds that the candidate turn is good."""
        hidden = self.model(input_ids, return_hidden=True)
        return self.head(pool(hidden, lengths, self.hparams.pooling)).squeeze(-1)

    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-weighted binary cross-entropy, logits)."""
        logits = self(batch["input_ids"], batch["lengths"])
        labels = batch["labels"]
        weights = self.class_weights[labels.long()]
        return F.binary_cross_entropy_with_logits(logits, labels, weight=weights), logits

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["lengths"].sum())

    def training_loss(self, batch: dict):
        loss, logits = self.losses(batch)
        return loss, {"acc": ((logits > 0).float() == batch["labels"]).float().mean()}

    def validation_step(self, batch: dict, batch_idx: int):
        _, logits = self.losses(batch)
        self.collected += list(zip(batch["indices"], torch.sigmoid(logits).tolist(),
                                   batch["labels"].tolist(), strict=True))

    def on_validation_epoch_end(self) -> None:
        p = self.eval_prefix
        rows = sorted(self.gather_list(self.collected))
        self.collected = []
        probabilities = np.array([r[1] for r in rows])
        labels = np.array([r[2] for r in rows]).astype(int)
        self.last = probabilities, labels
        scores = self.scores(probabilities, labels)
        self.log_dict({f"{p}/{name}": value for name, value in scores.items()},
                      prog_bar=p == "val")
        if self.fitting_validation():
            self.val_auc_best.update(scores["auc"])
            self.log("val/auc_best", self.val_auc_best.compute())
        self.log_progress()

    def scores(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        p, y = torch.tensor(probabilities, dtype=torch.float), torch.tensor(labels)
        weights = self.class_weights.cpu()[y]
        loss = F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y.float(), weight=weights)
        both = len(set(labels.tolist())) == 2
        return {"auc": float(binary_auroc(p, y)) if both else 0.5,
                "balanced_acc": balanced_accuracy(probabilities, labels),
                "acc": float(((probabilities > 0.5) == labels).mean()) if len(labels) else 0.0,
                "loss": float(loss)}

    # -- reranking -----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, contexts: list[str], candidates: list[str],
              batch_size: int = 32) -> list[float]:
        """P(good) of each candidate turn after its context (both rendered text)."""
        was_training = self.training
        self.eval()
        block_size = self.model.config.block_size
        rows = []
        for context, candidate in zip(contexts, candidates, strict=True):
            segments = self.tokenizer.encode_batch(split_rendered(context)) if context else []
            rows.append(scored_input(segments, self.tokenizer.encode(candidate), block_size))
        device = self.model.wte.weight.device
        out: list[float] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            lengths = torch.tensor([len(r) for r in batch], device=device)
            out += torch.sigmoid(self(pad(batch).to(device), lengths)).tolist()
        self.train(was_training)
        return out

    # -- evaluate.py ---------------------------------------------------------------------
    def evaluation_details(self) -> dict:
        probabilities, labels = self.last
        return {"calibration": calibration_bins(probabilities, labels),
                "predictions": [{"p_good": float(p), "good": bool(y)}
                                for p, y in zip(probabilities, labels, strict=True)]}

    def evaluation_figures(self) -> dict[str, bytes]:
        probabilities, labels = self.last
        return {"calibration": calibration_png(probabilities, labels,
                                               f"reward model, {len(labels)} turns")}

    def report(self, results: dict[str, float], split: str) -> str:
        probabilities, labels = self.last
        bins = calibration_bins(probabilities, labels)
        lines = [f"{split}: AUC {results[f'{split}/auc']:.4f}, balanced accuracy "
                 f"{results[f'{split}/balanced_acc']:.4f}, accuracy {results[f'{split}/acc']:.4f},"
                 f" loss {results[f'{split}/loss']:.4f} ({len(labels)} turns: "
                 f"{int(labels.sum())} good, {int((1 - labels).sum())} bad)",
                 f"expected calibration error {expected_calibration_error(bins):.4f}",
                 f"{'P(good) bin':<12} {'turns':>6} {'mean P':>7} {'good':>6}"]
        lines += [f"{b['low']:.1f}-{b['high']:.1f}      {b['count']:>6} "
                  f"{b['mean_predicted']:>7.3f} {b['fraction_good']:>6.3f}"
                  for b in bins if b["count"]]
        return "\n".join(lines)
