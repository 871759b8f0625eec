"""Config helpers: OmegaConf resolvers the YAML files use, and printing the resolved tree."""

from __future__ import annotations

import netrc
import os
import secrets

from omegaconf import DictConfig, OmegaConf

_RUN_SUFFIX = secrets.token_hex(3)


def wandb_offline() -> bool:
    """Offline unless the user chose otherwise or has logged in: a run never prompts."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def wandb_group(mode: object, task_name: str, sweep_dir: str) -> str:
    """Runs of one multirun share a W&B group named after the sweep folder."""
    if str(mode).endswith("MULTIRUN"):
        return f"{task_name}-{os.path.basename(sweep_dir)}"
    return task_name


def register_resolvers() -> None:
    """Idempotent; called by every entry point before Hydra composes the config."""
    resolvers = {
        # Two runs started in the same second get different folders.
        "run_suffix": lambda: _RUN_SUFFIX,
        "wandb_offline": wandb_offline,
        "wandb_group": wandb_group,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, so loggers' tables can filter by any key."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
