"""Make (or find cached) the stand-in for ImageNet weights of a config's backbone and print its path.

    python ray_jobs/standin.py [--config configs/demo.yaml] [key=value ...]

The file is what `model.pretrained: standin` (and `segment.pretrained: standin`) resolve to: the backbone pre-trained
as a plain classifier on a synthetic image set disjoint from the embedded default's (acr/train/standin.py). The demo
jobs make it on first use; this command makes it ahead of time, or tells where it is (to pass as model.pretrained=FILE).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import parse_job_args  # noqa: E402
from acr.runtime.boundary import run_job  # noqa: E402
from acr.train.job import run_local  # noqa: E402
from acr.train.standin import standin_weights  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _flags(p) -> None:
    p.add_argument("--backbone", default=None, help="the backbone (default: the config's model.backbone)")


def main(argv=None) -> None:
    cfg, _, args = parse_job_args(__doc__.splitlines()[0], DEFAULT_CONFIG, argv, job="train", add_args=_flags,
                                  default_output=False)
    print(standin_weights(cfg, run_local, backbone=args.backbone))


if __name__ == "__main__":
    run_job(main, "standin.py")
