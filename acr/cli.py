"""Shared command-line parsing for the ray_jobs scripts: --config FILE, --output-dir DIR, key=value overrides."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from acr.config import Config, ConfigError, load_config
from acr.distributed.storage import is_uri


def parse_job_args(description: str, default_config: Path | None, argv=None, job: str = "run", add_args=None,
                   uri_output: bool = False) -> tuple[Config, Path | str | None, argparse.Namespace]:
    """(config, output dir, all arguments). `add_args(parser)` adds a job's own flags. A job whose output folder
    has another default (`job=None`) gets None when --output-dir is not given. With `uri_output` the output may be
    a URI (s3://bucket/runs/x, returned as a string); other jobs write a local folder and refuse one."""
    p = argparse.ArgumentParser(description=description)
    if add_args:
        add_args(p)
    p.add_argument("--config", type=Path, default=default_config, help="YAML config (default: %(default)s)")
    p.add_argument("--output-dir", default=None,
                   help="the run folder; rerunning with the same folder resumes (default: outputs/<job>-<time>)"
                   + ("; or a URI such as s3://bucket/runs/name" if uri_output else ""))
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        p.exit(2, f"{p.prog}: config error: {exc}\n")
    out = args.output_dir
    if out is not None and is_uri(out):
        if not uri_output:
            p.exit(2, f"{p.prog}: --output-dir {out}: this job writes a local (or mounted shared) folder; only "
                      "ray_jobs/train.py writes to a URI\n")
    elif out is not None:
        out = args.output_dir = Path(out)
    else:
        out = Path("outputs") / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}" if job else None
    return cfg, out, args


def fail(exc: Exception) -> None:
    """Print a one-line error (the exception names the file, id or key) and exit non-zero."""
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
