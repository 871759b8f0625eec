"""Finding, writing and loading checkpoints: by file, or the best or last one of a run folder.

Every checkpoint carries, under CHECKPOINT_KEY, the model config, the tokenizer, the data
config and the resolved run config of its run, so a checkpoint file alone is enough to
evaluate, sample or resume. Loading uses `torch.load(weights_only=True)`, and the configs a
checkpoint stores may only name gptlab's own data classes (`ALLOWED_TARGETS`): a checkpoint
from anywhere can never run code on the loading machine. Writing goes through a temporary
file in the checkpoint's own folder (`AtomicCheckpointIO`), so a crash at any moment leaves
the previous checkpoint whole. A `.safetensors` checkpoint (safetensors_checkpoints.py) is
read without any pickle, and `task.init_from=hf:<folder or hub id>` starts from a Hugging
Face model (hf.py).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import UserError
from gptlab.models import build_model
from gptlab.models.gpt import GPTConfig
from gptlab.utils.files import save_atomic

if TYPE_CHECKING:
    from gptlab.hf import HFModel

CHECKPOINT_KEY = "gptlab"  # what a checkpoint carries besides the weights (GPTTask.artifacts)
LAST = "last.ckpt"

# The only classes a config stored in a checkpoint may build (evaluate.py rebuilds the run's
# data from it). Hydra would instantiate any importable callable, e.g. pathlib.Path.write_text.
ALLOWED_TARGETS = frozenset({
    "gptlab.data.lm_datamodule.LMDataModule",
    "gptlab.data.finetune.ClassificationDataModule",
    "gptlab.data.finetune.Seq2SeqDataModule",
    "gptlab.data.synthetic.SyntheticDataModule",
    "gptlab.data.summarization.SummarizationDataModule",
    "gptlab.data.summarization.Aeslc",
    "gptlab.data.summarization.GapSentences",
    "gptlab.data.dialogue.AgentDataModule",
    "gptlab.data.dialogue.RewardDataModule",
    "gptlab.data.taskmaster.Taskmaster4",
    "gptlab.data.taskmaster.Taskmaster4Rewards",
    "gptlab.data.taskmaster.Taskmaster4Text",
    "gptlab.data.documents.KnownFile",
    "gptlab.data.documents.TextFiles",
    "gptlab.data.documents.HFDataset",
    "gptlab.data.documents.TableColumn",
    "gptlab.data.documents.Combined",
    "gptlab.data.examples.LabeledFiles",
    "gptlab.data.examples.HFLabeled",
    "gptlab.data.examples.ParallelFiles",
    "gptlab.data.examples.Multi30k",
})
# Where the loading machine keeps its files; a stored config's paths are the training machine's.
LOCAL_PATH_KEYS = ("cache_dir", "download_dir")


class UnsafeCheckpoint(UserError):
    """A checkpoint whose stored config would build something other than gptlab's data."""


def check_stored_config(config: Any, where: str, key: str = "") -> None:
    """Refuse anything in a stored config that Hydra could turn into a call of foreign code."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and target not in ALLOWED_TARGETS:
            raise UnsafeCheckpoint(
                f"{where} names {target!r} at {key or 'the top'}, which is not one of gptlab's "
                f"data classes; nothing was run. Use a checkpoint you trust, or pass data=<config> "
                f"to evaluate it on data you choose"
            )
        for name, value in config.items():
            if isinstance(name, str) and name.startswith("_") and name != "_target_":
                raise UnsafeCheckpoint(f"{where} has the Hydra key {name!r} at {key or 'the top'}"
                                       f"; gptlab never stores one, so the file was altered")
            check_stored_config(value, where, f"{key}.{name}" if key else str(name))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_stored_config(value, where, f"{key}[{i}]")
    elif isinstance(config, str) and "${" in config:
        raise UnsafeCheckpoint(f"{where} has an interpolation {config!r} at {key}; gptlab stores "
                               f"resolved configs only, so the file was altered")


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

    @property
    def step(self) -> int:
        return int(self.contents.get("global_step", 0))

    @property
    def run_config(self) -> dict | None:
        """The resolved config of the run that wrote this checkpoint (None before gptlab 0.2)."""
        return self.artifacts.get("run_config")

    def data_config(self, local_paths: dict[str, str]) -> dict:
        """The run's data config, checked against the allow-list, with this machine's folders."""
        config = self.artifacts.get("data_config")
        if not config:
            raise UserError(f"checkpoint {self.path} carries no data config; pass data=<config>")
        check_stored_config(config, f"the data config stored in {self.path}")
        return _with_local_paths(config, local_paths)

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

        task_class = TASKS.get(self.artifacts["task"])
        if task_class is None:
            raise UserError(f"checkpoint {self.path} is of an unknown task "
                            f"{self.artifacts['task']!r}; known: {', '.join(TASKS)}")
        hparams = dict(self.contents.get("hyper_parameters", {}))
        hparams |= {"init_from": None, "compile": False}  # the weights come from here
        try:
            task = task_class(**hparams, tokenizer=self.tokenizer,
                              data_config=self.artifacts.get("data_config"))
        except TypeError as err:
            raise UserError(f"checkpoint {self.path} does not fit this gptlab version's "
                            f"{self.artifacts['task']} task ({err}); use the gptlab version "
                            f"that wrote it") from None
        task.load_state_dict(self.contents["state_dict"])
        return task.eval()


def _with_local_paths(config: Any, local_paths: dict[str, str]) -> Any:
    if isinstance(config, dict):
        return {key: local_paths[key] if key in local_paths and value is not None
                else _with_local_paths(value, local_paths) for key, value in config.items()}
    if isinstance(config, list):
        return [_with_local_paths(value, local_paths) for value in config]
    return config


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
    best = best_checkpoint(run_dir)
    if best is None:
        raise UserError(
            f"run folder {run_dir} has no checkpoint in {run_dir / 'checkpoints'}; train it "
            f"longer (a checkpoint is written at each validation) or pass ckpt=<file>"
        )
    return best, run_dir


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run selected: the one its results.json names, else the best-step file
    of the latest step (the callback keeps one), else last.ckpt."""
    folder = run_dir / "checkpoints"
    results = run_dir / "results.json"
    if results.is_file():
        named = json.loads(results.read_text()).get("best_checkpoint")
        if named and (folder / Path(named).name).is_file():  # the run folder may have moved
            return folder / Path(named).name
    steps = {int(m[1]): p for p in folder.glob("best-*.ckpt")
             if (m := re.search(r"step(\d+)", p.name))}
    if steps:
        return steps[max(steps)]
    last = folder / LAST
    return last if last.is_file() else None


def load_pretrained(init_from: str) -> Checkpoint | HFModel:
    """What `task.init_from` names: a checkpoint file, a run folder, or hf:<Hugging Face model>."""
    if str(init_from).startswith("hf:"):
        from gptlab.hf import HFModel  # it imports this module

        return HFModel(str(init_from).removeprefix("hf:"))
    path = Path(str(init_from)).expanduser()
    if not path.exists():
        raise UserError(
            f"task.init_from={init_from} does not exist; pass a checkpoint file or a "
            f"pretraining run folder (logs/pretrain/runs/...), or hf:<Hugging Face model>"
        )
    found, run_dir = find_checkpoint(run=str(path)) if path.is_dir() else (path, None)
    return load_checkpoint(found, run_dir)


def load_checkpoint(path: str | Path, run_dir: Path | None = None) -> Checkpoint:
    path = Path(path)
    if path.suffix == ".safetensors":
        from gptlab import safetensors_checkpoints  # it imports this module

        return Checkpoint(path, run_dir, safetensors_checkpoints.load(path))
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
    return Checkpoint(Path(path), run_dir, contents)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing through a temp file in the target folder + rename.

    Lightning's own atomic save stages the file in $TMPDIR, and across filesystems its final
    move becomes a copy over the old checkpoint, with no fsync; a crash then can leave a
    truncated last.ckpt. Loading is weights-only, whoever calls it.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
