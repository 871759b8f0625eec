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

    versus / fit / curves: as compare's --versus, --fit and --curves (experiments set them).
    """

    def __init__(self, versus: str | None = None, fit: bool = False,
                 curves: list[str] | None = None):
        self.versus, self.fit, self.curves = versus, fit, list(curves or [])

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            compare([str(sweep)], out=sweep, versus=self.versus, fit=self.fit,
                    curves=self.curves)
        except UserError as err:  # e.g. every job failed: the sweep's own errors say why
            log.warning("No comparison of the sweep %s: %s", sweep, err)
