"""What every task shares: the GPT, its optimizer and schedule, training logs, checkpoints.

A task is a LightningModule around `models.gpt.GPT`. Subclasses say how a batch becomes a
loss (`training_loss`), what validation measures, and what a checkpoint must carry for
evaluate.py and generate.py to rebuild them (`artifacts`). Fine-tuning starts from a
pretrained run through `init_from` (weights only; the optimizer starts fresh).

Checkpoints also carry what an exact resume needs beyond Lightning's own state: every RNG
state, the running means of the current logging window and the tokens and time so far.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import asdict, fields

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FullyShardedDataParallel

from gptlab.checkpoints import CHECKPOINT_KEY, load_pretrained
from gptlab.data.lm_datamodule import IGNORE_INDEX
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError
from gptlab.models import build_model
from gptlab.models.gpt import GPTConfig

log = logging.getLogger("gptlab")

# Fields that may differ between a pretrained model and the model it initialises.
_TRAINING_ONLY_FIELDS = {"dropout", "n_layer"}
# Wrappers that FSDP, activation checkpointing and torch.compile put into parameter names.
_WRAPPER_NAMES = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


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


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite; the run stops rather than train on garbage."""

    def __init__(self, step: int):
        super().__init__(
            f"the training loss is not finite at step {step}; the run stopped there. Lower "
            f"task.optimizer.lr or trainer.gradient_clip_val, or set task.skip_nonfinite=true to "
            f"skip such steps"
        )
        self.step = step


class FirstNonFiniteStep:
    """Remembers the first step whose loss was not finite, without waiting for the GPU.

    On the CPU the value is at hand, so the check is immediate. On an accelerator a per-step
    host read would stall the pipeline; the first bad step is kept on the device instead and
    read at every logging interval and before any checkpoint is written, so no checkpoint
    ever holds weights trained on a non-finite loss.
    """

    def __init__(self, immediate: bool | None = None) -> None:
        self.immediate = immediate  # None: on the CPU only
        self._first: torch.Tensor | None = None

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self.immediate or (self.immediate is None and loss.device.type == "cpu"):
            if bad:
                raise NonFiniteLoss(step)
            return
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first = torch.where(bad & (self._first < 0), step, self._first)

    def check(self) -> None:
        if self._first is not None and (step := int(self._first)) >= 0:
            raise NonFiniteLoss(step)


def rng_states() -> dict:
    """Every random generator a training step may draw from (dropout, sampling, data), as
    plain bytes and ints: loadable with weights_only and sendable between DDP ranks."""
    kind, keys, *rest = np.random.get_state()
    states = {
        "torch": _bytes(torch.get_rng_state()),
        "numpy": [kind, keys.tobytes(), *rest],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [_bytes(state) for state in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(_tensor(states["torch"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(state) for state in states["cuda"]])


def _bytes(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()


def _tensor(state: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


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
        skip_nonfinite: bool = False,
        tokenizer: Tokenizer | None = None,
        data_config: dict | None = None,
        run_config: dict | None = None,
    ):
        super().__init__()
        if isinstance(model_config, GPTConfig):
            model_config = asdict(model_config)
        self.save_hyperparameters(ignore=["tokenizer", "data_config", "run_config"])
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
        self.tokenizer, self.data_config, self.run_config = tokenizer, data_config, run_config
        self.eval_prefix = "val"  # the pipeline's final passes log as val_last/* and val_full/*
        self.tokens_seen, self.elapsed_s = 0, 0.0
        self.skipped_steps = 0
        self._step_clock: float | None = None
        self._last_logged_step = -1
        self._nonfinite = FirstNonFiniteStep()
        self._rng_to_restore: dict | None = None
        self._param_ndims: dict[str, int] = {}
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
    def training_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, extra per-step figures to report as train/<name>)."""
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        """Tokens in a batch, for throughput; subclasses count their real (unpadded) tokens."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int):
        loss, figures = self.training_loss(batch)
        if self.hparams.skip_nonfinite:
            finite = bool(torch.isfinite(loss.detach()))
            # Under DDP every rank must skip together, or the gradient all-reduce hangs.
            if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
                self.skipped_steps += 1
                log.warning("skipped step %d: the loss is not finite (%d skipped so far)",
                            self.trainer.global_step, self.skipped_steps)
                return None
        else:
            self._nonfinite.update(loss, self.trainer.global_step)
        self.record(loss=loss, **figures)
        return loss

    def record(self, **losses: torch.Tensor) -> None:
        """Add this step's losses to the running means reported every log_every_n_steps."""
        for name, value in losses.items():
            self._window_sums[name] = self._window_sums.get(name, 0.0) + value.detach()
        self._window_batches += 1

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter() - self.elapsed_s  # elapsed_s survives a resume
        self._step_clock = None

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            # Here, not at load time: the loaders and the sanity check come in between.
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

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
        self._nonfinite.check()
        self._last_logged_step = step
        if not self._window_batches:  # every step of the window was skipped
            return
        # Means over the steps since the last report.
        metrics = {f"train/{name}": float(total / self._window_batches)
                   for name, total in self._window_sums.items()}
        metrics |= {
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens": self.tokens_seen,
            "train/elapsed_s": self.elapsed_s,
        }
        if self.skipped_steps:
            metrics["train/skipped_steps"] = self.skipped_steps
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

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._nonfinite.check()  # never validate, and so checkpoint, diverged weights

    def on_validation_end(self) -> None:
        self._step_clock = None  # the next step's time would include this validation

    def fitting_validation(self) -> bool:
        """A validation of the training loop proper (not the sanity check, not a final pass)."""
        return (self.eval_prefix == "val" and self.trainer.state.fn == "fit"
                and not self.trainer.sanity_checking)

    def gather_list(self, items: list) -> list:
        """Every rank's items, in rank order: under DDP each rank validates its own batches,
        and a figure over the whole split (a corpus score, an AUC) needs all of them."""
        if (self._trainer is None or self.trainer.world_size == 1
                or not torch.distributed.is_initialized()):
            return items
        parts: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def log_progress(self) -> None:
        """Tokens and time beside each val metric, so time-to-metric reads off one CSV row."""
        if self.fitting_validation():
            self.log_dict({"val/tokens": float(self.tokens_seen), "val/elapsed_s": self.elapsed_s})

    # -- optimizer -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Shapes before any strategy wraps the model: FSDP hands the optimizer flat shards.
        self._param_ndims = {_plain_name(n): p.dim() for n, p in self.named_parameters()}

    def configure_optimizers(self):
        """AdamW without decay on biases and norms; the backbone's LR scaled by its own factor.

        Fused AdamW (one kernel for all parameters) unless a GradScaler (fp16) is in use: its
        gradients must be unscaled before clipping, which a fused step would do only later.
        """
        opt = dict(self.hparams.optimizer)
        weight_decay = opt.pop("weight_decay", 0.0)
        lr = opt.pop("lr")
        if opt.get("fused") and self._uses_grad_scaler():
            log.info("AdamW runs unfused: fp16's gradient scaler must unscale before clipping")
            opt["fused"] = False
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                name = _plain_name(name)
                decays = self._param_ndims.get(name, p.dim()) >= 2  # matrices, not biases/norms
                groups.setdefault((name.startswith("model."), decays), []).append(p)
        scale = self.hparams.backbone_lr_scale
        param_groups = [
            {"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr": lr * (scale if backbone else 1.0)}
            # The backbone's matrices first: train/lr reports the first group's rate.
            for (backbone, decays), params in sorted(groups.items(), reverse=True)
        ]
        optimizer = torch.optim.AdamW(param_groups, lr=lr, **opt)
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(optimizer)}

    def _uses_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Clip the global gradient norm here rather than in Lightning's precision plugins.

        Those refuse to clip for a fused optimizer under any mixed precision (though bf16 never
        scales gradients, and fp16 runs unfused here), and FSDP's refuses norm clipping, which
        FSDP's own clip_grad_norm_ does correctly over the shards.
        """
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, FullyShardedDataParallel):
            wrapped.clip_grad_norm_(gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.parameters() if p.grad is not None], gradient_clip_val)

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
        """What evaluate.py, generate.py and a resume need besides weights and hyperparameters."""
        return {
            "task": self.task_name,
            "model_config": dict(self.hparams.model_config),
            "tokenizer": self.tokenizer.to_str() if self.tokenizer else None,
            "data_config": self.data_config,
            "run_config": self.run_config,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._nonfinite.check()
        for logger in self.loggers:
            logger.save()  # the metrics up to this checkpoint survive a crash after it
        checkpoint[CHECKPOINT_KEY] = self.artifacts()
        checkpoint[CHECKPOINT_KEY]["progress"] = {
            "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_s,
            "skipped_steps": self.skipped_steps, "last_logged_step": self._last_logged_step,
            "window": {"sums": {k: float(v) for k, v in self._window_sums.items()},
                       "batches": self._window_batches},
            "rng": self._rng_states_of_all_ranks(),
        }

    def _rng_states_of_all_ranks(self) -> list[dict]:
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [rng_states()]
        gathered: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, rng_states())
        return gathered

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        progress = checkpoint.get(CHECKPOINT_KEY, {}).get("progress", {})
        self.tokens_seen = progress.get("tokens_seen", 0)
        self.elapsed_s = progress.get("elapsed_s", 0.0)
        self.skipped_steps = progress.get("skipped_steps", 0)
        self._last_logged_step = progress.get("last_logged_step", -1)
        window = progress.get("window", {"sums": {}, "batches": 0})
        self._window_sums = dict(window["sums"])
        self._window_batches = window["batches"]
        states = progress.get("rng")
        if states:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._rng_to_restore = states[rank] if rank < len(states) else states[0]

    # -- evaluation --------------------------------------------------------------------
    def final_eval_loader(self, datamodule, max_tokens: int | None):
        """What the end-of-run passes score: every example of the validation split, or evenly
        spread ones up to about max_tokens tokens (final_eval_tokens; its default is larger
        than any labeled split here, debug=fast makes the passes quick)."""
        return self._scoped(datamodule.eval_dataloader("val", max_tokens),
                            datamodule.eval_dataloader("val"), "examples")

    def _scoped(self, loader, whole, unit: str):
        """`loader`, noting for final_eval_scope how much of the `whole` split it scores."""
        scored, total = len(loader.dataset), len(whole.dataset)
        self._final_scope = ("whole val split" if scored == total else
                             f"{scored:,} of {total:,} val {unit}, final_eval_tokens")
        return loader

    def final_eval_scope(self) -> str:
        """Which part of the split the end-of-run passes scored, for the summary lines."""
        return getattr(self, "_final_scope", "whole val split")

    def evaluation_passes(self, datamodule, split: str) -> list[tuple[str, object]]:
        """(metric prefix, dataloader) pairs that evaluate.py runs for `split`."""
        return [(split, datamodule.eval_dataloader(split))]

    def evaluation_details(self) -> dict:
        """Non-scalar results of the last evaluation, saved beside the metrics."""
        return {}

    def evaluation_figures(self) -> dict[str, bytes]:
        """PNG pictures of the last evaluation by name, saved beside its report."""
        return {}

    def report(self, results: dict[str, float], split: str) -> str:
        """The table evaluate.py prints."""
        return "\n".join(f"{name:<24} {value:.4f}" for name, value in results.items())


def _plain_name(name: str) -> str:
    """A parameter's name as the unwrapped module knows it."""
    return _WRAPPER_NAMES.sub("", name)
