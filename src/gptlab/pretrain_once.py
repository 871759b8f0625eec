"""One pretraining run shared by every fine-tuning job of a sweep (`pretrain_once:` config).

GPT-1-style experiments fine-tune many variants from the same pretrained model. With

    pretrain_once:
      name: gpt1_sst2
      overrides: [experiment=sst2_pretrain]

the first job that needs the model runs `train.py <overrides>` into
logs/pretrain/shared/<name>-<hash of its overrides>/ and every job then starts from it
(task.init_from). Later jobs, parallel launchers and later sweeps reuse the finished run;
a file lock makes parallel jobs wait for the one that trains. A crashed pretraining is
moved aside and resumed from its last.ckpt by the next job.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from gptlab.errors import UserError

log = logging.getLogger("gptlab")

# Overrides of a fine-tuning job that its pretraining gets too. Where and how to run does not
# change what is trained, so a finished pretraining is reused whatever these say; debug does.
RUN_GROUPS = ("paths", "hardware", "logger")
FORWARDED_GROUPS = (*RUN_GROUPS, "debug")


def _group(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]


def forwarded(job_overrides: list[str]) -> list[str]:
    return [o for o in job_overrides if _group(o) in FORWARDED_GROUPS]


def shared_run_dir(log_dir: str | Path, name: str, overrides: list[str]) -> Path:
    """logs/pretrain/shared/<name>-<hash of the overrides that decide what is trained>."""
    identity = [o for o in overrides if _group(o) not in RUN_GROUPS]
    digest = hashlib.sha1("\n".join(identity).encode()).hexdigest()[:8]
    return Path(log_dir) / "pretrain" / "shared" / f"{name}-{digest}"


def pretrain_once(spec: DictConfig, log_dir: str | Path, job_overrides: list[str]) -> Path:
    """The run folder of the shared pretraining, trained first if no job has done so yet."""
    overrides = [*spec.overrides, *forwarded(job_overrides)]
    run_dir = shared_run_dir(log_dir, spec.name, overrides)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(run_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel jobs wait here for the one that trains
        if (run_dir / "results.json").is_file():
            log.info("Starting from the shared pretraining run %s", run_dir)
            return run_dir
        _train(run_dir, overrides)
    return run_dir


def _train(run_dir: Path, overrides: list[str]) -> None:
    args = [*overrides, f"hydra.run.dir={run_dir}", "hydra.mode=RUN"]
    if run_dir.exists():  # an attempt that crashed: keep its logs, go on from its last.ckpt
        crashed = run_dir.with_name(f"{run_dir.name}.crashed-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(crashed)
        log.info("The shared pretraining had crashed (moved to %s); starting it again", crashed)
        if (crashed / "checkpoints" / "last.ckpt").is_file():
            # Copied back, so the best checkpoint so far is where the resumed run expects it.
            shutil.copytree(crashed / "checkpoints", run_dir / "checkpoints")
            args.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    train_py = Path(os.environ.get("GPTLAB_ROOT", ".")) / "train.py"
    log.info("Pretraining once for this sweep: train.py %s", " ".join(args))
    proc = subprocess.run([sys.executable, str(train_py), *args])
    if proc.returncode != 0:
        raise UserError(
            f"the shared pretraining ({' '.join(overrides)}) failed with exit "
            f"{proc.returncode}: see its output above and {run_dir}/train.log; fix it and "
            f"start the sweep again (it resumes from the last checkpoint)"
        )
