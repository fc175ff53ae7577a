"""The one error boundary: worker errors unwrapped in one function, and the job scripts' exit path.

A job script runs its work through :func:`run_job`: an :class:`acr.errors.AcrError` (bad input, a failed run; its
message names the file, key or value) is printed on a line of its own and the script exits non-zero (2 for a
configuration error, 1 otherwise); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable

from acr.errors import AcrError, ConfigError
from acr.runtime.logs import setup_logging


def root_cause(error: BaseException) -> BaseException:
    """The exception a worker, actor or Ray Data task raised (e.g. a DataError naming a corrupt file), unwrapped
    from Ray Train's WorkerGroupError / TrainingFailedError, Ray's RayTaskError and Ray Data's UserCodeException, so
    that the user reads one clear message instead of a remote traceback. An error of this library is returned as
    such; otherwise the deepest cause (a bug keeps its type and message)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    chain, e = [], error
    while isinstance(e, BaseException) and e not in chain:
        chain.append(e)
        if isinstance(e, AcrError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    # Ray Data hands a UDF's failure over as UserCodeException with the original only in the remote traceback text.
    for e in chain:
        found = re.findall(r"^(acr(?:\.\w+)+)\.(\w+): (.+)$", str(e), flags=re.M)
        if found:
            module, name, message = found[-1]
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and issubclass(cls, AcrError):
                return cls(message)
    return chain[-1] if len(chain) > 1 else error


def reraise_root_cause(exc: BaseException) -> None:
    """Raise the library error inside `exc` (from it), or `exc` itself where there is none."""
    cause = root_cause(exc)
    if cause is exc or not isinstance(cause, AcrError):
        raise exc
    raise cause from exc


def run_job(main: Callable[[], object], prog: str) -> None:
    """Run a job script's work; errors of this library end the script with their message on a line of its own."""
    setup_logging()
    try:
        main()
    except ConfigError as exc:
        _say(f"{prog}: config error: {exc}")
        sys.exit(2)
    except AcrError as exc:
        _say(f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted; rerun the same command (same --output-dir) to resume")
        sys.exit(130)


def _say(line: str) -> None:
    # A newline first: a progress bar may have left the cursor at the end of its line.
    sys.stdout.flush()
    print(f"\n{line}", file=sys.stderr, flush=True)
