"""The library's errors. Every error raised for bad input or a failed run is an :class:`AcrError` whose message
names the file, key or value; the job scripts print it on a line of its own and exit non-zero (acr.runtime.boundary).
Any other exception is a bug and keeps its traceback. Each class also derives from the builtin its callers expect
(ValueError, RuntimeError), so code written against those keeps working."""

from __future__ import annotations


class AcrError(Exception):
    """Base of the library's errors."""


class ConfigError(AcrError, ValueError):
    """A configuration key or value is invalid; the message names it (and the job that refused it)."""


class DataError(AcrError, ValueError):
    """A dataset file or value is bad (missing, corrupt, inconsistent); the message names the file or image id."""


class CheckpointError(AcrError, ValueError):
    """A checkpoint or run folder that does not load; the message names it."""


class WeightsError(AcrError, ValueError):
    """A weights file that does not load or does not fit the network; the message names the file and tensor."""


class NonFiniteLossError(AcrError, RuntimeError):
    """Too many consecutive non-finite losses; the run stopped and its last good checkpoint is kept."""


class StorageError(AcrError, ValueError):
    """An output folder or URI that cannot be opened or written; the message names it."""


class RunError(AcrError, RuntimeError):
    """A run that could not produce its result (e.g. a search in which no trial finished an epoch)."""
