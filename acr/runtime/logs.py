"""Logging of the library: every module logs to `logging.getLogger(__name__)` (under "acr"); a job script and every
Ray worker call :func:`setup_logging` once, which prints the library's records as plain lines on stdout (through
tqdm, so that a progress bar and a log line never share a line). Ray's own loggers are left as Ray configures them."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            tqdm.write(msg, file=sys.stdout if record.levelno < logging.WARNING else sys.stderr)
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Plain lines for the "acr" loggers (warnings prefixed), once per process."""
    root = logging.getLogger("acr")
    if any(isinstance(h, _TqdmHandler) for h in root.handlers):
        return
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"
