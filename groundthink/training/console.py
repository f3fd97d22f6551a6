"""The console side of a run's logging (configured in conf/hydra/default.yaml): messages print above an active
progress bar instead of onto its line, and warnings and errors go to stderr."""

from __future__ import annotations

import logging
import sys


class ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:  # clears and redraws the bars of every tqdm instance around the message
                tqdm.tqdm.write(message, file=stream)
            else:
                stream.write(message + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


class _DropLightningAds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and "LitLogger" not in message


def quiet_lightning() -> None:
    """One copy of each Lightning message, through the run's own handlers, without the device banners ("GPU
    available: False ...", "fit stopped": the closing summary says what matters), the ads, or the deprecation
    warning Lightning raises about its own use of torch's pytree."""
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        if not any(isinstance(f, _DropLightningAds) for f in logger.filters):
            logger.addFilter(_DropLightningAds())
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
