"""One pretraining run shared by every fine-tuning job of a sweep (`pretrain_once:` config).

GPT-1-style experiments fine-tune many variants from the same pretrained model. With

    pretrain_once:
      name: gpt1_sst2
      overrides: [experiment=sst2_pretrain]

the first job that needs the model runs `train.py <overrides>` into
logs/pretrain/shared/<name>-<identity>/ and every job then starts from it (task.init_from).
Later jobs, parallel launchers and later sweeps reuse the finished run; a file lock makes
parallel jobs wait for the one that trains. A crashed pretraining is resumed from its
last.ckpt by the next job.

The identity is a hash of what decides the pretrained weights: the pretraining's resolved
config (its own overrides composed as train.py would, where and how it runs left out), the
code (gptlab's sources and configs) and the data's fingerprint. An edited experiment file,
changed code or changed data therefore trains anew instead of reusing a stale run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gptlab.errors import UserError
from gptlab.resume import leaves, run_only

log = logging.getLogger("gptlab")

# Overrides of a fine-tuning job that its pretraining gets too: where and how to run, which
# do not change what is trained, and debug, which does.
FORWARDED_GROUPS = ("paths", "hardware", "logger", "debug")
CODE = Path(__file__).resolve().parent


def _group(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]


def forwarded(job_overrides: list[str]) -> list[str]:
    return [o for o in job_overrides if _group(o) in FORWARDED_GROUPS]


@cache
def code_version(conf_dir: Path) -> str:
    """A hash of gptlab's Python sources and of the configs."""
    digest = hashlib.sha256()
    for root, pattern in ((CODE, "*.py"), (conf_dir, "*.yaml")):
        for path in sorted(root.rglob(pattern)):
            digest.update(f"{path.relative_to(root)}\n".encode() + path.read_bytes())
    return digest.hexdigest()


def identity(overrides: list[str]) -> dict:
    """What the shared run's weights depend on (see the module docstring)."""
    cfg = compose("train", overrides=overrides)
    config = {k: v for k, v in leaves(OmegaConf.to_container(cfg, resolve=True)).items()
              if not run_only(k)}
    conf_dir = Path(os.environ.get("GPTLAB_ROOT", ".")) / "conf"
    data = instantiate(cfg.data)
    return {"config": config, "code": code_version(conf_dir),
            "data": data.fingerprint() if hasattr(data, "fingerprint") else None}


def shared_run_dir(log_dir: str | Path, name: str, overrides: list[str]) -> Path:
    """logs/pretrain/shared/<name>-<hash of the identity>."""
    text = json.dumps(identity(overrides), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
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
    if (run_dir / "checkpoints" / "last.ckpt").is_file():  # train.py continues from there
        log.info("The shared pretraining %s stopped before its end; continuing it", run_dir)
    train_py = Path(os.environ.get("GPTLAB_ROOT", ".")) / "train.py"
    log.info("Pretraining once for this sweep: train.py %s", " ".join(args))
    proc = subprocess.run([sys.executable, str(train_py), *args])
    if proc.returncode != 0:
        raise UserError(
            f"the shared pretraining ({' '.join(overrides)}) failed with exit "
            f"{proc.returncode}: see its output above and {run_dir}/train.log; fix it and "
            f"start the sweep again (it resumes from the last checkpoint)"
        )
