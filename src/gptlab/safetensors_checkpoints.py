"""gptlab checkpoints as .safetensors files: the weights and the run's artifacts, no pickle.

A .ckpt is a torch.save zip (pickle inside) that also carries the optimizer and loop state for
resuming. A .safetensors checkpoint carries what evaluate.py, generate.py and task.init_from
need, in a format whose reader runs no code at all:

- tensors: the task's state_dict under the .ckpt's names (`model.wte.weight`, `head.1.bias`,
  ...); a tied weight (`model.lm_head.weight` is `model.wte.weight`) is stored once.
- header metadata, every value a JSON string:
  `gptlab.<key>` for each entry of a .ckpt's "gptlab" artifacts (`gptlab.task`,
  `gptlab.model_config`, `gptlab.tokenizer`, `gptlab.data_config`, ...), `hyper_parameters`
  (the task's constructor arguments), `tied_weights` ({alias: stored name}), and `format`
  ("pt", what Hugging Face's readers expect).

Written by `python -m gptlab.hf safetensors ckpt=...|run=...` or, during training, by
`callbacks.model_checkpoint.safetensors=true` (each .ckpt gets a .safetensors twin); read by
checkpoints.load_checkpoint wherever a checkpoint file is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from gptlab.checkpoints import CHECKPOINT_KEY
from gptlab.errors import UserError
from gptlab.utils.files import write_atomic

SUFFIX = ".safetensors"
ARTIFACT_PREFIX = f"{CHECKPOINT_KEY}."
HPARAMS_KEY = "hyper_parameters"
TIED_KEY = "tied_weights"
RESUME_STATE = {"progress"}  # RNG states, logging window: resuming needs the .ckpt anyway
INSTALL_HINT = "pip install -e '.[hf]'"


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError as err:
        raise UserError(f"safetensors checkpoints need the safetensors package; install it "
                        f"with {INSTALL_HINT}") from err
    return safetensors


def save(contents: dict, path: str | Path) -> None:
    """Write a checkpoint's contents (as torch.load gives a .ckpt) to a .safetensors file."""
    tensors, tied = _unique_tensors(contents["state_dict"])
    metadata = {"format": "pt", TIED_KEY: json.dumps(tied),
                HPARAMS_KEY: _to_json(contents.get(HPARAMS_KEY, {}), HPARAMS_KEY)}
    metadata |= {ARTIFACT_PREFIX + key: _to_json(value, key)
                 for key, value in contents[CHECKPOINT_KEY].items() if key not in RESUME_STATE}
    write_atomic(path, _safetensors().torch.save(tensors, metadata))


def load(path: str | Path) -> dict:
    """A .safetensors checkpoint as the dict torch.load gives for a .ckpt (minus loop state)."""
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({reason}); "
                        f"write it again (python -m gptlab.hf safetensors ckpt=<.ckpt>)") from err
    if f"{ARTIFACT_PREFIX}model_config" not in metadata:
        raise UserError(f"{path} has no gptlab metadata (model config, tokenizer), so it is not "
                        f"a gptlab checkpoint; for a Hugging Face model folder use "
                        f"task.init_from=hf:<folder>")
    for alias, name in json.loads(metadata.get(TIED_KEY, "{}")).items():
        state[alias] = state[name]
    return {
        "state_dict": state,
        HPARAMS_KEY: json.loads(metadata.get(HPARAMS_KEY, "{}")),
        CHECKPOINT_KEY: {key[len(ARTIFACT_PREFIX):]: json.loads(value)
                         for key, value in metadata.items() if key.startswith(ARTIFACT_PREFIX)},
    }


def convert(ckpt: Path, out: Path) -> None:
    """Write the .safetensors form of a .ckpt file."""
    from gptlab.checkpoints import load_checkpoint  # it reads .safetensors through this module

    save(load_checkpoint(ckpt).contents, out)


def twin(ckpt_path: str | Path) -> Path:
    """Where the .safetensors copy of a .ckpt file goes: beside it, same stem."""
    return Path(ckpt_path).with_suffix(SUFFIX)


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """(tensors to store, {alias: stored name}); safetensors refuses two names for one tensor."""
    tensors, tied, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, tied


def _to_json(value, key: str) -> str:
    try:
        return json.dumps(value)
    except TypeError as err:
        raise UserError(f"checkpoint entry {key!r} cannot be stored as JSON in a safetensors "
                        f"header ({err}); keep the .ckpt for this run") from err


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint that can also keep a .safetensors twin of every checkpoint.

    With safetensors=True each best-*.ckpt and last.ckpt gets a .safetensors file beside it,
    written when the .ckpt is and removed with it, so a run folder can be handed to people
    who will not unpickle files. Resuming still uses the .ckpt (it has the optimizer state).
    """

    def __init__(self, *args, safetensors: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if safetensors:
            _safetensors()  # fail at start-up, not at the first checkpoint
        self.safetensors = safetensors

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.safetensors and trainer.is_global_zero:
            convert(Path(filepath), twin(filepath))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if self.safetensors and trainer.is_global_zero:
            twin(filepath).unlink(missing_ok=True)
