"""A Hydra callback: every multirun ends with `compare` over its sweep folder."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gptlab.errors import UserError
from gptlab.reporting.compare import compare

log = logging.getLogger("gptlab")


class CompareSweep(Callback):
    """Writes the sweep's comparison table and plots (see compare.py) when its jobs are done.

    versus / fit: as compare's --versus and --fit (experiments set them, e.g. scaling).
    """

    def __init__(self, versus: str | None = None, fit: bool = False):
        self.versus, self.fit = versus, fit

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            compare([str(sweep)], out=sweep, versus=self.versus, fit=self.fit)
        except UserError as err:  # e.g. every job failed: the sweep's own errors say why
            log.warning("No comparison of the sweep %s: %s", sweep, err)
