"""Shared start-up of the entry points: resolvers, the project root, resume, one-line errors."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode

from gptlab.errors import UserError
from gptlab.resume import latest_run
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


class JobFailed(CompactHydraException):
    """One job of a multirun failed on a user error: that job fails, the sweep goes on.

    Hydra records the job as failed (a sweeper counts it as a failed trial) and, at the end
    of the sweep, prints which job failed and this one line; exiting at once would end every
    other job of the sweep too.
    """


def resume_arguments(args: list[str], config_dir: Path) -> list[str]:
    """`resume=<run folder>` or `resume=auto`: run Hydra in that run's folder, leaving the
    .hydra/ files the run started with as they are."""
    value = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    if value in (None, "", "null") or any(a.startswith("hydra.run.dir=") for a in args):
        return args  # nothing to resume, or a DDP rank that Lightning already pointed there
    if "-m" in args or "--multirun" in args:
        raise UserError("resume continues one run and cannot be part of a sweep (-m); resume "
                        "each job of a sweep by its folder: resume=<sweep folder>/<job>")
    folder = _latest_run(args, config_dir) if value == "auto" else Path(value).expanduser()
    if not (folder / ".hydra" / "config.yaml").is_file():
        raise UserError(f"resume={value}: {folder} is not a run folder (no .hydra/config.yaml); "
                        f"pass a folder that train.py printed as 'run folder:'")
    return [*args, f"hydra.run.dir='{folder.resolve()}'", "hydra.output_subdir=null"]


def _latest_run(args: list[str], config_dir: Path) -> Path:
    from hydra import compose, initialize_config_dir

    overrides = [a for a in args if not a.startswith("resume=")]
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return latest_run(Path(cfg.paths.log_dir) / cfg.task_name / "runs", overrides)


def hydra_entry(script: str, config_name: str, fn: Callable,
                literal_keys: tuple[str, ...] = ()) -> Callable[[], None]:
    """Wrap `fn(cfg)` as a Hydra main whose user errors print one line and exit 2."""
    root = Path(script).resolve().parent
    sys.argv = sys.argv[:1] + quote_literal_args(sys.argv[1:], literal_keys)
    os.environ.setdefault("GPTLAB_ROOT", str(root))  # logs/ and data/ live beside train.py
    register_resolvers()
    if config_name == "train":
        with _one_line_errors():
            sys.argv = sys.argv[:1] + resume_arguments(sys.argv[1:], root / "conf")

    @hydra.main(version_base="1.3", config_path=str(root / "conf"), config_name=config_name)
    @functools.wraps(fn)
    def main(cfg):
        with _one_line_errors():
            return fn(cfg)

    return main


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A UserError prints `error: ...` and exits 2, or fails just its job in a multirun."""
    try:
        yield
    except Exception as exc:
        user_error = _user_error(exc)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(f"error: {user_error}") from None
        sys.exit(2)


def _user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind exc, also when Hydra's instantiate wrapped it in its own."""
    while exc is not None and not isinstance(exc, UserError):
        exc = exc.__cause__
    return exc
