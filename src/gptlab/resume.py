"""Resuming a run in its own folder: which run, whether the command line still fits, and
what the run's logs keep.

`python train.py resume=<run folder>` (or `resume=auto`: the latest run with the same
command line) continues that run in its folder and its W&B run. A checkpoint carries the
resolved config of its run; a resume whose config differs in anything that changes what is
trained is refused, naming the keys. Where and how the run executes may change (hardware,
loggers, paths, data loader workers): a preempted job may come back on another machine.
"""

from __future__ import annotations

import csv
import re
from io import StringIO
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from gptlab.errors import UserError
from gptlab.utils.files import write_atomic

# Keys (and key prefixes) that do not change what is trained.
RUN_ONLY_KEYS = (
    "resume", "ckpt_path", "paths", "logger", "callbacks", "hardware", "tags",
    "float32_matmul_precision", "final_eval_tokens",
    "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.precision", "trainer.plugins", "trainer.enable_progress_bar",
    "trainer.default_root_dir", "task.compile",
    "data.num_workers", "data.num_proc", "data.eval_batch_size",
)
# Wherever they appear (e.g. data.source.sources[0].download_dir): this machine's folders.
RUN_ONLY_LEAVES = ("cache_dir", "download_dir")
FINAL_PASS_PREFIXES = ("val_last/", "val_full/")


def run_only(key: str) -> bool:
    leaf = re.sub(r"\[\d+\]$", "", key.rsplit(".", 1)[-1])
    return leaf in RUN_ONLY_LEAVES or any(
        key == prefix or key.startswith(prefix + ".") or key.startswith(prefix + "[")
        for prefix in RUN_ONLY_KEYS)


def run_config(cfg: DictConfig) -> dict:
    """The resolved config of a run, as its checkpoints carry it."""
    return OmegaConf.to_container(cfg, resolve=True)


def leaves(tree, prefix: str = "") -> dict:
    """{'a': {'b': [1, {'c': 2}]}} -> {'a.b[0]': 1, 'a.b[1].c': 2}."""
    if isinstance(tree, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in tree.items()]
    elif isinstance(tree, list):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(tree)]
    else:
        return {prefix: tree}
    flat = {}
    for key, value in items:
        flat |= leaves(value, key)
    return flat


def training_differences(theirs: dict, ours: dict) -> list[str]:
    """`key (run: a, now: b)` for every key that changes what is trained."""
    old, new = leaves(theirs), leaves(ours)
    keys = sorted(k for k in old.keys() | new.keys()
                  if not run_only(k) and old.get(k, "<unset>") != new.get(k, "<unset>"))
    return [f"{k} (run: {old.get(k, '<unset>')}, now: {new.get(k, '<unset>')})" for k in keys]


def check_same_training(ours: dict, checkpoint) -> None:
    """Refuse to continue `checkpoint` under a config that trains something else."""
    theirs = checkpoint.run_config
    if theirs is None:
        return  # written before checkpoints carried their config: nothing to compare with
    differences = training_differences(theirs, ours)
    if differences:
        more = len(differences) - 6
        shown = "; ".join(differences[:6]) + (f" and {more} more" if more > 0 else "")
        raise UserError(
            f"cannot continue {checkpoint.path}: this command line changes what is trained: "
            f"{shown}. Resume with the run's own settings, or start a new run (task.init_from="
            f"{checkpoint.path} starts from its weights)"
        )


def latest_run(runs_folder: Path, overrides: list[str]) -> Path:
    """resume=auto: the newest run folder under `runs_folder` started with `overrides`
    (run-only overrides aside) that has a checkpoint to continue from."""
    wanted = _training_overrides(overrides)
    for folder in sorted(runs_folder.glob("*"), reverse=True):  # names start with the time
        saved = folder / ".hydra" / "overrides.yaml"
        if (folder / "checkpoints" / "last.ckpt").is_file() and saved.is_file() and \
                _training_overrides(yaml.safe_load(saved.read_text()) or []) == wanted:
            return folder
    raise UserError(
        f"resume=auto: no run in {runs_folder} was started with these overrides "
        f"({' '.join(wanted) or 'none'}) and has a checkpoint; pass resume=<run folder>, or "
        f"start a new run without resume"
    )


def _training_overrides(overrides: list[str]) -> list[str]:
    """Hydra's own overrides (hydra.*) are not saved in a run's overrides.yaml either."""
    keys = [(o, o.lstrip("+~").split("=", 1)[0]) for o in overrides]
    return sorted(o for o, key in keys if not run_only(key) and not key.startswith("hydra."))


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the W&B run a run folder logged to (wandb/<offline-run|run>-<time>-<id>)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def read_metric_rows(path: Path, until_step: int) -> tuple[list[str], list[dict]]:
    """The header and the rows of a metrics.csv that a resume from `until_step` keeps.

    Rows after the checkpoint are logged again by the resumed run; the end-of-run passes of
    an attempt that got that far are scored again too.
    """
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if int(float(row["step"])) <= until_step and not any(
            row.get(k) for k in row if k.startswith(FINAL_PASS_PREFIXES))]
        return list(reader.fieldnames or []), rows


def rows_as_csv(header: list[str], rows: list[dict]) -> str:
    out = StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_metric_rows(path: Path, header: list[str], rows: list[dict]) -> None:
    write_atomic(path, rows_as_csv(header, rows))
