"""Shared start-up of the entry points: resolvers, the project root, one-line user errors."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra

from gptlab.errors import UserError
from gptlab.utils.config import register_resolvers


def hydra_entry(script: str, config_name: str, fn: Callable) -> Callable[[], None]:
    """Wrap `fn(cfg)` as a Hydra main whose user errors print one line and exit 2."""
    root = Path(script).resolve().parent
    os.environ.setdefault("GPTLAB_ROOT", str(root))  # logs/ and data/ live beside train.py
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(root / "conf"), config_name=config_name)
    @functools.wraps(fn)
    def main(cfg):
        try:
            return fn(cfg)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return main
