"""Shared command-line parsing for the ray_jobs scripts: --config FILE, --output-dir DIR, key=value overrides."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from acr.config import Config, ConfigError, load_config


def parse_job_args(description: str, default_config: Path | None, argv=None, job: str = "run", add_args=None
                   ) -> tuple[Config, Path | None, argparse.Namespace]:
    """(config, output dir, all arguments). `add_args(parser)` adds a job's own flags. A job whose output folder
    has another default (`job=None`) gets None when --output-dir is not given."""
    p = argparse.ArgumentParser(description=description)
    if add_args:
        add_args(p)
    p.add_argument("--config", type=Path, default=default_config, help="YAML config (default: %(default)s)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="the run folder; rerunning with the same folder resumes (default: outputs/<job>-<time>)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        p.exit(2, f"{p.prog}: config error: {exc}\n")
    out = args.output_dir or (Path("outputs") / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}" if job else None)
    return cfg, out, args


def fail(exc: Exception) -> None:
    """Print a one-line error (the exception names the file, id or key) and exit non-zero."""
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
