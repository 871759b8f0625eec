"""Shared start-up of the entry points: resolvers, the project root, one-line user errors."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra

from gptlab.errors import UserError
from gptlab.utils.config import register_resolvers


def quote_literal_args(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """Quote the values of free-text keys, so `text=a, b` is a text, not a Hydra sweep.

    Hydra reads commas, brackets and quotes in a value as syntax; the shell has already
    removed the user's own quotes, so `text="nice, witty"` would arrive as a sweep of two.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and not (len(value) > 1 and value[0] == value[-1] in "'\""):
            # Inside quotes Hydra unescapes only backslashes before a quote or the end.
            value = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
            value = f"'{value}'"
            arg = f"{key}={value}"
        quoted.append(arg)
    return quoted


def hydra_entry(script: str, config_name: str, fn: Callable,
                literal_keys: tuple[str, ...] = ()) -> Callable[[], None]:
    """Wrap `fn(cfg)` as a Hydra main whose user errors print one line and exit 2."""
    root = Path(script).resolve().parent
    sys.argv = sys.argv[:1] + quote_literal_args(sys.argv[1:], literal_keys)
    os.environ.setdefault("GPTLAB_ROOT", str(root))  # logs/ and data/ live beside train.py
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(root / "conf"), config_name=config_name)
    @functools.wraps(fn)
    def main(cfg):
        try:
            return fn(cfg)
        except Exception as exc:
            user_error = _user_error(exc)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr)
            sys.exit(2)

    return main


def _user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind exc, also when Hydra's instantiate wrapped it in its own."""
    while exc is not None and not isinstance(exc, UserError):
        exc = exc.__cause__
    return exc
