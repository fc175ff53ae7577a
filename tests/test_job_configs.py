"""Every command of the README and docs/ and every preset of configs/, validated by each job that accepts it, on 1, 2, 4 and 8
workers: a job refuses only what it uses (a global batch that does not divide among its workers is refused, by the
job whose batch it is); a setting of another job's section never stops it. Nothing here needs the data or a
cluster: the validation runs before anything is read."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from acr.config import Config, ConfigError, apply_overrides, load_config, stage_workers, validate
from tests.conftest import REPO

WORKERS = (1, 2, 4, 8)
DEFAULT_CONFIG = {"train": "configs/demo.yaml", "tune": "configs/tune_demo.yaml", "segment": "configs/demo.yaml",
                  "pipeline": "configs/pipeline_demo.yaml", "prepare_data": None, "pseudo_labels": None}
SHORT_KEYS = {"pseudo_labels": ("checkpoint=", "pseudo."), "segment": ("labels=", "segment.")}
FLAGS_WITH_VALUE = {"--config", "--output-dir", "--space", "--splits"}


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(job, arguments) of every `ray_jobs/<job>.py` command in the bash blocks of the README and docs/
    (continuations joined, comments dropped)."""
    commands = []
    text = "\n".join(d.read_text() for d in DOCUMENTS)
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"ray_jobs/(\w+)\.py(.*)", line)
            if found:
                commands.append((found.group(1), shlex.split(found.group(2), comments=True)))
    return commands


def parse(job: str, args: list[str]) -> tuple[str | None, list[str]]:
    """(--config file or the job's default, key=value overrides) of a command line."""
    config, overrides, it = DEFAULT_CONFIG[job], [], iter(args)
    for a in it:
        if a in FLAGS_WITH_VALUE:
            value = next(it)
            config = value if a == "--config" else config
        elif "=" in a:
            short, section = SHORT_KEYS.get(job, (None, None))
            overrides.append(section + a if short and a.startswith(short) else a)
    return config, overrides


def batches(cfg: Config, job: str) -> dict[str, tuple[int, int]]:
    """The global batches that `job` divides among workers: key -> (batch, workers)."""
    train = {"train.batch_size": (cfg.train.batch_size, cfg.scaling.num_workers)}
    irn = {"pseudo.irn_batch_size": (cfg.pseudo.irn_batch_size, stage_workers(cfg, "irn"))}
    segment = {"segment.batch_size": (cfg.segment.batch_size, stage_workers(cfg, "segment"))}
    if job == "pipeline":
        pl = cfg.pipeline
        return {**({} if pl.checkpoint else train), **({} if pl.labels else irn), **segment}
    return {"train": train, "tune": train, "pseudo_labels": irn, "segment": segment, "prepare_data": {}}[job]


def config_of(config: str | None, overrides: list[str]) -> Config:
    """The config a job would run with, read without any job's rules (a pseudo-label job's comes from its
    checkpoint: the defaults stand in for it here)."""
    return load_config(REPO / config if config else None, overrides, job=None)


def check_on_workers(job: str, config: str | None, overrides: list[str]) -> list[int]:
    """Validate for `job` on every worker count the command does not fix itself; the counts it passed on. Where a
    batch of the job does not divide, the job must refuse naming that batch; everywhere else it must accept."""
    own = any(o.startswith("scaling.num_workers=") for o in overrides)
    passed = []
    for workers in ([None] if own else WORKERS):
        extra = [] if workers is None else [f"scaling.num_workers={workers}"]
        cfg = config_of(config, overrides + extra)
        bad = [key for key, (batch, n) in batches(cfg, job).items() if batch % n]
        if bad:
            with pytest.raises(ConfigError, match=re.escape(bad[0])):
                validate(cfg, job)
        else:
            validate(cfg, job)  # any ConfigError here is a section the job does not use, or a bad command
            passed.append(cfg.scaling.num_workers)
    return passed


COMMANDS = readme_commands()


def test_the_readme_has_a_command_for_every_job():
    assert {job for job, _ in COMMANDS} == set(DEFAULT_CONFIG) and len(COMMANDS) >= 15


@pytest.mark.parametrize("job,args", COMMANDS, ids=[f"{j}:{' '.join(a)[:60]}" for j, a in COMMANDS])
def test_every_documented_command_validates_for_its_job(job, args):
    config, overrides = parse(job, args)
    if config and not (REPO / config).is_file():
        # the output of another job (a search's best.yaml): a full config of the job's own shape stands in for it
        assert config.startswith("runs/"), f"a document names a config that does not exist: {config}"
        config = DEFAULT_CONFIG[job]
    assert check_on_workers(job, config, overrides), "no worker count passes"


def test_the_readme_cluster_command_validates_with_its_four_workers():
    args = next(a for job, a in COMMANDS if job == "train" and "scaling.num_workers=4" in a)
    config, overrides = parse("train", args)
    cfg = load_config(REPO / config, overrides, job="train")
    assert cfg.scaling.num_workers == 4 and cfg.segment.batch_size % 4  # DeepLab's batch does not divide: not its job
    with pytest.raises(ConfigError, match=r"segment.batch_size=10 must divide evenly among 4 DeepLab workers .*"
                                          r"refused by the segment job"):
        validate(cfg, "segment")
    validate(apply_overrides(cfg, {"segment.num_workers": 2}), "segment")  # DeepLab's own scaling


PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
PRESET_JOBS = ("train", "tune", "segment", "pipeline", "prepare_data", "pseudo_labels")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("job", PRESET_JOBS)
def test_every_preset_validates_for_every_job(preset, job):
    cfg = config_of(f"configs/{preset}", [])
    root = ["data.root=/data/dataset"] if cfg.data.format != "synthetic" else []  # the real datasets' presets name
    # no folder: the user does. The ViT presets too: every job takes them (IRN and DeepLab on a CNN of the checkpoint).
    assert check_on_workers(job, f"configs/{preset}", root)


def test_a_vit_classifier_refuses_irn_on_its_own_backbone_naming_the_choices():
    cfg = config_of("configs/demo_vit.yaml", [])
    with pytest.raises(ConfigError, match=r"pseudo.irn_backbone=classifier: the classifier is a ViT \(deit_tiny\).*"
                                          "choose auto, encoder"):
        validate(apply_overrides(cfg, {"pseudo.irn_backbone": "classifier"}), "pseudo_labels")
    with pytest.raises(ConfigError, match="pseudo.irn_backbone=encoder: the classifier was trained without a "
                                          "reconstructor"):
        validate(apply_overrides(cfg, {"pseudo.irn_backbone": "encoder", "method.reconstructor": "none"}),
                 "pseudo_labels")
    validate(apply_overrides(cfg, {"method.reconstructor": "none"}), "pseudo_labels")  # auto: the ImageNet CNN


def test_a_pipeline_error_names_the_stage_and_its_job():
    cfg = config_of("configs/pipeline_demo.yaml", [])
    with pytest.raises(ConfigError, match=r"^the pipeline's segment stage: segment.batch_size=8 must divide evenly "
                                          r"among 3 DeepLab workers .* \(refused by the segment job\)$"):
        validate(apply_overrides(cfg, {"segment.num_workers": 3}), "pipeline")
    with pytest.raises(ConfigError, match="unknown job 'deeplab'"):
        validate(cfg, "deeplab")
    assert Path(REPO / "configs/pipeline_demo.yaml").is_file()


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_every_relative_link_of_the_documents_resolves(document):
    """Links and pictures of the README and docs/ (outside code blocks) name files that exist."""
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)]
    relative = [t for t in targets if t and not re.match(r"[a-z]+://", t)]
    missing = [t for t in relative if not (document.parent / t).exists()]
    assert not missing, missing
    assert relative or document.name != "README.md"  # the README links its pages and picture


# a commit of this repository a document may name: the default reference of benchmarks/side_by_side.py
NAMED_COMMITS = {"f623edb"}


def test_the_readme_is_a_guide_and_no_document_tells_history():
    """The README at most 200 lines; no commit of this repository named in the README, docs/ or configs/ (history
    lives in git; hexadecimal words that are not its commits, such as weight-file digests, pass)."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
    files = [*DOCUMENTS, *sorted((REPO / "configs").glob("*.yaml"))]
    words = {w for f in files for w in re.findall(r"\b[0-9a-f]{7,40}\b", f.read_text()) if re.search(r"[a-f]", w)}
    commits = {w for w in words - NAMED_COMMITS if subprocess.run(
        ["git", "cat-file", "-e", f"{w}^{{commit}}"], cwd=REPO, capture_output=True).returncode == 0}
    assert not commits, sorted(commits)


def test_every_file_the_documents_name_exists():
    """Paths of this repository named in the README and docs/ (acr/..., tests/..., configs/... and so on) exist."""
    text = "\n".join(d.read_text() for d in DOCUMENTS)
    named = set(re.findall(r"\b((?:acr|tests|benchmarks|experiments|ray_jobs|configs|search_spaces)/[\w/]+\.(?:py|yaml))",
                           text))
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert len(named) > 30 and not missing, missing
