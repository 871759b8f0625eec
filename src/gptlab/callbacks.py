"""Preemption: a signal from a scheduler becomes a checkpoint, a clear exit and a requeue.

Clusters warn a job before they stop it: SLURM sends SIGTERM on preemption and the
`--signal` of the job (submitit's default: SIGUSR2) before the time limit; a person may send
SIGTERM or SIGUSR1 by hand. Lightning alone turns SIGTERM into a clean exit with status 0 and
no checkpoint, so the work since the last validation is lost and the run looks finished.

Here the signal only sets a flag. At the start of the next training batch (a clean step
boundary: the previous step, its validation and its checkpoints are done) every rank agrees
to stop, last.ckpt is written at that step, and `Preempted` ends the run; the entry point
prints how to resume and exits non-zero. Under SLURM the job is then requeued: through
submitit's own handler when submitit launched it (it counts timeouts against
max_num_timeout), else with `scontrol requeue`. A requeued job lands in the same run folder
and continues from its last.ckpt by itself (pipeline.train).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L

from gptlab.checkpoints import LAST

log = logging.getLogger("gptlab")

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Preempted(Exception):
    """Training stopped on a signal after saving `checkpoint` at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: Path, previous_handler=None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.previous_handler = previous_handler
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal

    def requeue(self) -> None:
        """Hand the job back to its scheduler, if it runs under one."""
        handler = self.previous_handler
        if callable(handler) and getattr(handler, "__module__", "").startswith("submitit"):
            handler(self.signum, None)  # submitit requeues its own job (and may exit)
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job and self.signum != signal.SIGTERM:  # on SIGTERM SLURM requeues by itself
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            if array:
                job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())


class Preemption(L.Callback):
    """Save last.ckpt and stop when one of `signals` arrives (see the module docstring)."""

    def __init__(self, signals: list[str] | tuple[str, ...] = SIGNALS):
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: saving a checkpoint after the current step",
                        signal.Signals(signum).name)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def _install(self) -> None:
        """Replace the handlers Lightning registers just before these hooks (it would turn
        SIGTERM into an exit with status 0 and no checkpoint)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        checkpoint = Path(trainer.default_root_dir) / "checkpoints" / LAST
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            checkpoint = Path(trainer.checkpoint_callback.dirpath) / LAST
        trainer.save_checkpoint(checkpoint)
        signum = self.received or signal.SIGTERM  # another rank received it
        raise Preempted(signum, trainer.global_step, checkpoint, self._previous.get(signum))

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
