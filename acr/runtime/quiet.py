"""The worker setup hook of a Ray the job started itself (acr.runtime.cluster.init_ray). Every Ray worker process of
that Ray runs it at start, Train's and Ray Data's helper actors included, so this module imports nothing but
`logging`: importing torch here (through the rest of the library) cost each of those processes seconds of CPU.
"""

from __future__ import annotations

import logging

# Loggers of Ray's that report known-harmless conditions of a Ray this job started itself, with a traceback:
# - Train's autoscaling client asks Ray Data's autoscaling coordinator (an actor) for the workers' resources and
#   gives up after 5 s when the coordinator is slow to start (a loaded machine): a 17-line GetTimeoutError that
#   changes nothing, since a local Ray has no autoscaler to ask (on a joined cluster the warning is kept);
# - without the dashboard Ray's state API is absent, and Train's placement-group cleaner logs every second that it
#   cannot query it (a search always runs with the dashboard, where the cleaner works).
QUIET_LOCAL_LOGGERS = {
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": "Failed to send resource request",
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": "Failed to query Ray Train Controller",
}


class _DropKnownHarmless(logging.Filter):
    """Drops the records of a logger that start with a known-harmless message. A filter, not a level: Train
    reconfigures its loggers in the controller (logging.config resets the levels of existing child loggers)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_local_ray() -> None:
    """Worker setup hook of a Ray the job started: see QUIET_LOCAL_LOGGERS."""
    for name, prefix in QUIET_LOCAL_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownHarmless) for f in logger.filters):
            logger.addFilter(_DropKnownHarmless(prefix))
