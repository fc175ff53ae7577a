"""Shared command-line parsing for the ray_jobs scripts: --config FILE, --output-dir DIR, key=value overrides, the
config validated by the job's own rules (acr.config.JOBS)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from acr.config import Config, ConfigError, load_config
from acr.storage import is_uri

# Where `ray job submit --working-dir` unpacks the code that its driver runs in (a folder of Ray's session).
RAY_WORKING_DIR = "runtime_resources/working_dir_files"


def parse_job_args(description: str, default_config: Path | None, argv=None, job: str = "train", add_args=None,
                   uri_output: bool = False, default_output: bool = True
                   ) -> tuple[Config, Path | str | None, argparse.Namespace]:
    """(config, output dir, all arguments). `add_args(parser)` adds a job's own flags. Without --output-dir the
    output is outputs/<job>-<time> (None with `default_output=False`). With `uri_output` it may be a URI
    (s3://bucket/runs/name, returned as a string); other jobs write a local folder and refuse one. Errors are
    ConfigErrors (the job's boundary prints them and exits with 2)."""
    p = argparse.ArgumentParser(description=description)
    if add_args:
        add_args(p)
    p.add_argument("--config", type=Path, default=default_config, help="YAML config (default: %(default)s)")
    p.add_argument("--output-dir", default=None,
                   help="the run folder; rerunning with the same folder resumes (default: outputs/<job>-<time>)"
                   + ("; or a URI such as s3://bucket/runs/name" if uri_output else ""))
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides, job=job)
    args.output_dir = output_dir(args.output_dir, job, uri_output, default_output)
    return cfg, args.output_dir, args


def output_dir(given: str | None, job: str, uri_output: bool, default_output: bool = True) -> Path | str | None:
    """The job's output folder: as given (a URI only where the job writes one), or outputs/<job>-<time>."""
    if given is not None and is_uri(given):
        if not uri_output:
            raise ConfigError(f"--output-dir {given}: the {job} job writes a local (or mounted shared) folder; "
                              "train.py, tune.py, pseudo_labels.py, segment.py and pipeline.py write to a URI")
        return given
    out = Path(given) if given is not None else (
        Path("outputs") / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}" if default_output else None)
    if out is not None and not out.expanduser().is_absolute() and RAY_WORKING_DIR in Path.cwd().as_posix():
        raise ConfigError(f"--output-dir {given or '(default)'}: a relative folder, and this job runs in Ray's "
                          f"temporary copy of the code ({Path.cwd()}, from `ray job submit --working-dir`), which "
                          "Ray deletes: give a URI (s3://bucket/runs/name) or an absolute folder")
    return out
