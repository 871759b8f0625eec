"""Finding and loading checkpoints: by file, or the best one of a run folder.

Every checkpoint carries, under CHECKPOINT_KEY, the model config, the tokenizer and the data
config of its run, so a checkpoint file alone is enough to evaluate or sample. Loading uses
`torch.load(weights_only=True)`: a checkpoint can never run code on the loading machine.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError
from gptlab.models import build_model
from gptlab.models.gpt import GPTConfig

CHECKPOINT_KEY = "gptlab"  # what a checkpoint carries besides the weights (GPTTask.artifacts)


@dataclass
class Checkpoint:
    path: Path
    run_dir: Path | None
    contents: dict

    @property
    def artifacts(self) -> dict:
        return self.contents[CHECKPOINT_KEY]

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.artifacts["tokenizer"])

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict (the task module keeps the model under `model.`)."""
        prefix = "model."
        return {k[len(prefix):]: v for k, v in self.contents["state_dict"].items()
                if k.startswith(prefix)}

    def model(self) -> torch.nn.Module:
        """The model (GPT or EncoderDecoder) with this checkpoint's weights, in eval mode."""
        model = build_model(GPTConfig(**self.artifacts["model_config"]))
        model.load_state_dict(self.weights())
        return model.eval()

    def task(self):
        """The whole task module (GPT plus any head), rebuilt from its hyperparameters."""
        from gptlab.tasks import TASKS  # tasks import this module

        task_class = TASKS[self.artifacts["task"]]
        hparams = dict(self.contents.get("hyper_parameters", {}))
        hparams |= {"init_from": None, "compile": False}  # the weights come from here
        task = task_class(**hparams, tokenizer=self.tokenizer,
                          data_config=self.artifacts.get("data_config"))
        task.load_state_dict(self.contents["state_dict"])
        return task.eval()


def find_checkpoint(run: str | None = None, ckpt: str | None = None) -> tuple[Path, Path | None]:
    """(checkpoint file, run folder) from `ckpt=FILE` or `run=FOLDER` (its best checkpoint)."""
    if ckpt:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint file {path} does not exist; pass ckpt=<file.ckpt>")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, run_dir
    if not run:
        raise UserError("say which model to load: run=<run folder> or ckpt=<checkpoint file>")
    run_dir = Path(run).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass run=<logs/.../runs/...>")
    candidates = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    best = [p for p in candidates if not p.name.startswith("last")]
    if not candidates:
        raise UserError(
            f"run folder {run_dir} has no checkpoint in {run_dir / 'checkpoints'}; train it "
            f"longer (a checkpoint is written at each validation) or pass ckpt=<file>"
        )
    # The checkpoint callback keeps one best file (save_top_k=1) besides last.ckpt.
    return (best or candidates)[-1], run_dir


def load_pretrained(init_from: str) -> Checkpoint:
    """The checkpoint that `task.init_from` names: a checkpoint file or a run folder."""
    path = Path(str(init_from)).expanduser()
    if not path.exists():
        raise UserError(
            f"task.init_from={init_from} does not exist; pass a checkpoint file or a "
            f"pretraining run folder (logs/pretrain/runs/...)"
        )
    found, run_dir = find_checkpoint(run=str(path)) if path.is_dir() else (path, None)
    return load_checkpoint(found, run_dir)


def load_checkpoint(path: Path, run_dir: Path | None = None) -> Checkpoint:
    try:
        # mmap: tensors are read when used, so reading only the artifacts (e.g. the
        # tokenizer of task.init_from) does not read the weights and optimizer state.
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"checkpoint {path} is corrupt or not a checkpoint ({reason}); use another "
            f"checkpoint of the run (e.g. last.ckpt) or retrain"
        ) from err
    if not isinstance(contents, dict) or CHECKPOINT_KEY not in contents:
        raise UserError(
            f"{path} is not a gptlab checkpoint (it lacks the model config and tokenizer); "
            f"pass a checkpoint written by gptlab's train.py"
        )
    return Checkpoint(path, run_dir, contents)
