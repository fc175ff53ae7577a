"""The paper's whole pipeline in one process and one Ray (ray_jobs/pipeline.py), each stage in its own folder:

    [1] 1_cams/           the classifier: a Ray Tune search (pipeline.search, acr.tune.job) or one training run
                          (acr.train); or pipeline.checkpoint, a given one
    [2] 2_pseudo_labels/  CAMs -> CRF -> IRN -> masks (acr.pseudo); or pipeline.labels, given label maps
    [3] 3_deeplab/        DeepLab trained on the pseudo-labels, evaluated on segment.val_split (acr.segment)
    [4] 4_deeplab_gt/     the same DeepLab on the ground-truth masks: the fully supervised upper bound
                          (pipeline.upper_bound; where every training image has a mask)
    [5] report.md, report.json, report.png: every stage's numbers beside the paper's

A stage whose folder holds its summary.json is finished and is not run again; a stage that was interrupted is
run again in its folder and continues from its own files (checkpoints, per-image files, state.pt).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from acr.checkpoint import resolve_checkpoint
from acr.config import Config, ConfigError, apply_overrides, dump_yaml, num_classes, to_dict, validate
from acr.data.sources import ensure_shards
from acr.pseudo.job import job_config, run_pseudo_labels
from acr.runtime.cluster import init_ray, job_cpus, job_nodes
from acr.runtime.reach import driver_disk_is_shared, stage_inputs
from acr.segment.job import resolve_labels, run_segment
from acr.segment.train_deeplab import GT
from acr.storage import RunFolder
from acr.train.job import run_training
from acr.tune.job import run_tune
from acr.viz import save_report_plot

log = logging.getLogger(__name__)

FOLDERS = {"cams": "1_cams", "pseudo_labels": "2_pseudo_labels", "deeplab": "3_deeplab", "deeplab_gt": "4_deeplab_gt"}
DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
TIMES_FILE = "stage_seconds.json"

# ACR (Kweon et al., CVPR 2023), PASCAL VOC 2012, mIoU %: Table 3 (pseudo-labels on train) and Table 4 (DeepLab);
# the fully supervised DeepLab-v2 ResNet-101 of kazuto1011/deeplab-pytorch's README as the upper bound.
PAPER = {"seed_miou": 60.3, "crf_miou": 65.9, "mask_miou": 72.3, "voc_val": 71.9, "voc_test": 71.9, "coco_val": 45.3,
         "full_supervision_val": 76.65, "full_supervision_val_crf": 77.93}


def finished(folder: str | Path | RunFolder) -> dict | None:
    """The summary of a finished stage (its summary.json, complete), else None."""
    return RunFolder.of(folder).read_json("summary.json")  # None where cut short while written: not finished


class Stages:
    """Runs the stages in order, records what each did (ran / kept / given) and how long it took."""

    def __init__(self, out: RunFolder):
        self.out = out
        self.record: dict[str, dict] = {}
        self.seconds = out.read_json(TIMES_FILE) or {}

    def folder(self, name: str) -> str:
        """A stage's folder, as a location to open (a local path or a URI)."""
        return self.out.sub(FOLDERS[name]).location if self.out.uri_prefix else f"{self.out.path}/{FOLDERS[name]}"

    def run(self, name: str, title: str, fn) -> dict:
        folder = self.folder(name)
        summary = finished(folder)
        if summary is not None:
            log.info("[%s] %s: finished in an earlier run, kept (%s)", name, title, folder)
            self.record[name] = {"status": "kept", "folder": str(folder), "seconds": self.seconds.get(name)}
            return summary
        log.info("[%s] %s -> %s", name, title, folder)
        t0 = time.perf_counter()
        summary = fn(folder)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.out.write_json(TIMES_FILE, self.seconds)
        self.record[name] = {"status": "ran", "folder": str(folder), "seconds": self.seconds[name]}
        return summary


def needs_classifier(cfg: Config) -> bool:
    """Stage 1 is needed for the pseudo-labels (no pipeline.labels) or as DeepLab's initialisation."""
    sg = cfg.segment
    return not cfg.pipeline.labels or (cfg.pipeline.init_segmentation_from_classifier and not sg.pretrained
                                       and not sg.init_backbone)


def _cams(cfg: Config, stages: Stages, space: Path) -> tuple[str | None, dict]:
    """[1] The checkpoint of the classifier, and its CAM score."""
    pl = cfg.pipeline
    if pl.checkpoint:
        ckpt = resolve_checkpoint(pl.checkpoint, "pipeline.checkpoint")
        stages.record["cams"] = {"status": "given", "checkpoint": ckpt}
        return ckpt, {}
    if not needs_classifier(cfg):
        stages.record["cams"] = {"status": "skipped", "reason": "pipeline.labels given and DeepLab does not start "
                                 "from the classifier"}
        return None, {}
    if pl.search:
        summary = stages.run("cams", "CAMs: Ray Tune search", lambda d: run_tune(cfg, space, d))
        score = {"cam_miou": summary.get("best_cam_miou_reported"), "cam_split": summary.get("report_split"),
                 "best_trial": summary.get("best_trial"), "best_config": summary.get("best_config")}
    else:
        summary = stages.run("cams", "CAMs: one training run", lambda d: run_training(cfg, d))
        score = {"cam_miou": summary.get("cam_miou"), "cam_split": summary.get("split")}
    ckpt = resolve_checkpoint(stages.folder("cams"))
    stages.record["cams"].update({"checkpoint": ckpt, **score})
    return ckpt, score


def _pseudo_labels(cfg: Config, stages: Stages, ckpt: str | None) -> tuple[str, dict]:
    """[2] The folder of pseudo-label maps, and the job's summary (its split and Table 3 levels)."""
    pl = cfg.pipeline
    if pl.labels:
        labels = resolve_labels(pl.labels)
        summary = finished(pl.labels) or {}
        stages.record["pseudo_labels"] = {"status": "given", "labels": labels}
        return labels, summary
    overrides = {f"pseudo.{k}": v for k, v in to_dict(cfg.pseudo).items() if k != "checkpoint"}
    overrides["data.cache_dir"] = cfg.data.cache_dir
    job = job_config(apply_overrides(cfg, {"pseudo.checkpoint": ckpt}), overrides)
    summary = stages.run("pseudo_labels", "pseudo-labels: CAMs -> CRF -> IRN -> masks",
                         lambda d: run_pseudo_labels(job, d))
    stages.record["pseudo_labels"].update({k: summary.get(k) for k in (
        "split", "num_images", "seed_threshold", "seed_miou", "crf_miou", "mask_miou", "mask_precision",
        "mask_recall")})
    return resolve_labels(stages.folder("pseudo_labels")), summary


def _segment_config(cfg: Config, labels: str, pseudo_summary: dict, ckpt: str | None) -> Config:
    """Stage 3's config: DeepLab on `labels`, on the images the pseudo-label job labelled, its backbone from the
    stage-1 classifier where no ImageNet weights are given (pipeline.init_segmentation_from_classifier)."""
    sg, values = cfg.segment, {"segment.labels": labels}
    if pseudo_summary.get("split"):
        values["segment.split"] = pseudo_summary["split"]
        values["segment.max_images"] = pseudo_summary.get("config", {}).get("pseudo", {}).get("max_images")
    if cfg.pipeline.init_segmentation_from_classifier and not sg.pretrained and not sg.init_backbone and ckpt:
        values["segment.init_backbone"] = ckpt
    return apply_overrides(cfg, values, source="the pipeline")


def _gt_masks_missing(cfg: Config) -> str | None:
    """Why the upper bound cannot be trained (images of segment.split without a ground-truth mask), or None."""
    uri, manifest = ensure_shards(apply_overrides(cfg, {"eval.enabled": False}), [cfg.segment.split],
                                  progress=False)
    info = manifest["splits"][cfg.segment.split]
    if info.get("masks", 0) < info["rows"]:
        return (f"split '{cfg.segment.split}' has ground-truth masks for {info.get('masks', 0)} of its "
                f"{info['rows']} images")
    return None


def _stage_inputs(cfg: Config, out: RunFolder, searching: bool) -> Config:
    """On a cluster of several nodes: the shards of every stage's splits and the weights copied once into the
    pipeline's storage (acr.runtime.reach), so that no stage copies its own."""
    if driver_disk_is_shared():
        return cfg
    splits = [cfg.data.train_split] + ([cfg.tune.select_split] if searching else []) \
        + ([cfg.eval.split] if cfg.eval.enabled else []) + [cfg.pseudo.split, cfg.segment.split, cfg.segment.val_split]
    uri, _ = ensure_shards(apply_overrides(cfg, {"eval.enabled": False}), list(dict.fromkeys(splits)))
    return stage_inputs(cfg, out, uri)


SEG_KEYS = ("val_miou", "val_miou_ms", "val_miou_crf", "val_images_scored", "train_images", "backbone", "head",
            "backbone_init", "epochs")


def run_pipeline(cfg: Config, out: str | Path, space: str | Path | None = None) -> dict:
    """Run (or continue) every stage in `out`; returns the report (also out/report.json, report.md, report.png)."""
    validate(cfg, "pipeline")
    out = RunFolder(out)
    out.makedirs()
    pl = cfg.pipeline
    space = Path(space or pl.space or DEFAULT_SPACE)
    if pl.search and not pl.checkpoint and needs_classifier(cfg) and not space.is_file():
        raise ConfigError(f"pipeline.space={space}: search space file not found")
    out.write_text("config.yaml", dump_yaml(cfg))
    if not cfg.ray.num_cpus and not cfg.ray.address:
        cfg = apply_overrides(cfg, {"ray.num_cpus": job_cpus(cfg, "pipeline", cfg.tune.max_concurrent or 1)})
    searching = (pl.search and not pl.checkpoint and needs_classifier(cfg)
                 and finished(out.sub(FOLDERS["cams"])) is None)
    init_ray(cfg, "pipeline", trials=(cfg.tune.max_concurrent or 1) if searching else 0)  # one Ray for every stage
    cfg = _stage_inputs(cfg, out, searching)
    stages = Stages(out)
    ckpt, _ = _cams(cfg, stages, space)
    labels, pseudo_summary = _pseudo_labels(cfg, stages, ckpt)
    seg_cfg = _segment_config(cfg, labels, pseudo_summary, ckpt)
    seg = stages.run("deeplab", "DeepLab on the pseudo-labels", lambda d: run_segment(seg_cfg, d))
    stages.record["deeplab"].update({k: seg.get(k) for k in SEG_KEYS})
    gt = None
    if pl.upper_bound:
        gt_cfg = apply_overrides(seg_cfg, {"segment.labels": GT})
        reason = None if finished(stages.folder("deeplab_gt")) else _gt_masks_missing(gt_cfg)
        if reason:
            stages.record["deeplab_gt"] = {"status": "skipped", "reason": reason}
        else:
            gt = stages.run("deeplab_gt", "DeepLab on the ground truth (upper bound)",
                            lambda d: run_segment(gt_cfg, d))
            stages.record["deeplab_gt"].update({k: gt.get(k) for k in SEG_KEYS})
    else:
        stages.record["deeplab_gt"] = {"status": "skipped", "reason": "pipeline.upper_bound=false"}
    report = make_report(cfg, stages.record, seg, gt)
    report["nodes"] = job_nodes()
    write_report(out, report)
    return report


def make_report(cfg: Config, record: dict, seg: dict, gt: dict | None) -> dict:
    """Our numbers (fractions) beside the paper's (mIoU %)."""
    report = {"dataset": cfg.data.format, "data_root": cfg.data.root, "num_classes": num_classes(cfg),
              "val_split": cfg.segment.val_split, "stages": record,
              "val_miou_pseudo": seg.get("val_miou"), "val_miou_pseudo_ms": seg.get("val_miou_ms"),
              "val_miou_pseudo_crf": seg.get("val_miou_crf"),
              "val_miou_gt": gt.get("val_miou") if gt else None, "val_miou_gt_ms": gt.get("val_miou_ms") if gt else None,
              "val_miou_gt_crf": gt.get("val_miou_crf") if gt else None, "paper": PAPER,
              "total_seconds": round(sum(r.get("seconds") or 0 for r in record.values()), 1)}
    if gt and gt.get("val_miou_crf"):
        report["fraction_of_full_supervision"] = seg["val_miou_crf"] / gt["val_miou_crf"]
    report["paper_fraction_of_full_supervision"] = PAPER["voc_val"] / PAPER["full_supervision_val_crf"]
    return report


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def report_markdown(r: dict) -> str:
    st, p = r["stages"], r["paper"]
    cams, ps = st.get("cams", {}), st.get("pseudo_labels", {})
    voc = r["dataset"] == "voc"
    lines = [
        f"# ACR pipeline report ({r['dataset']}{', ' + r['data_root'] if r['data_root'] else ''}, "
        f"{r['num_classes']} classes)", "",
        "mIoU in %. The paper's numbers are ACR on PASCAL VOC 2012 (ResNet-38, 40 epochs, DeepLab-v2)"
        + ("." if voc else "; on another dataset they are a reference point, not a target."), "",
        "| stage | what | ours | paper |", "|---|---|---|---|",
        f"| 1 CAMs | CAM mIoU on '{cams.get('cam_split', '-')}' | {_pct(cams.get('cam_miou'))} | - |",
        f"| 2 pseudo-labels | seed (CAM) on '{ps.get('split', '-')}' | {_pct(ps.get('seed_miou'))} | "
        f"{p['seed_miou']} (Table 3, VOC train) |",
        f"| 2 pseudo-labels | + CRF | {_pct(ps.get('crf_miou'))} | {p['crf_miou']} |",
        f"| 2 pseudo-labels | mask (IRN) | {_pct(ps.get('mask_miou'))} | {p['mask_miou']} |",
        f"| 3 DeepLab on pseudo-labels | '{r['val_split']}', single scale | {_pct(r['val_miou_pseudo'])} | - |",
        f"| 3 DeepLab on pseudo-labels | multi-scale + flip | {_pct(r['val_miou_pseudo_ms'])} | - |",
        f"| 3 DeepLab on pseudo-labels | multi-scale + flip + CRF | {_pct(r['val_miou_pseudo_crf'])} | "
        f"{p['voc_val']} (Table 4, VOC val; test {p['voc_test']}, COCO val {p['coco_val']}) |",
        f"| 4 DeepLab on ground truth | single scale | {_pct(r['val_miou_gt'])} | {p['full_supervision_val']} "
        "(DeepLab-v2 R101, fully supervised, deeplab-pytorch) |",
        f"| 4 DeepLab on ground truth | multi-scale + flip + CRF | {_pct(r['val_miou_gt_crf'])} | "
        f"{p['full_supervision_val_crf']} (+ CRF) |",
    ]
    if r.get("fraction_of_full_supervision") is not None:
        lines.append(f"| 3 / 4 | pseudo-label DeepLab as a share of the fully supervised one (+ CRF) | "
                     f"{_pct(r['fraction_of_full_supervision'])} | {_pct(r['paper_fraction_of_full_supervision'])} "
                     "(71.9 / 77.93) |")
    lines += ["", "| stage | status | seconds | folder |", "|---|---|---|---|"]
    for name, rec in st.items():
        lines.append(f"| {name} | {rec['status']}{': ' + rec['reason'] if rec.get('reason') else ''} | "
                     f"{rec.get('seconds') if rec.get('seconds') is not None else '-'} | "
                     f"{rec.get('folder') or rec.get('checkpoint') or rec.get('labels') or '-'} |")
    lines += ["", f"Total (stages run or recorded): {r['total_seconds']} s. Pictures: 1_cams/ (cam_overlays.png or "
              "trials.png), 2_pseudo_labels/levels.png, 3_deeplab/predictions.png, 4_deeplab_gt/predictions.png, "
              "report.png."]
    return "\n".join(lines) + "\n"


def write_report(out: RunFolder, report: dict) -> None:
    out.write_json("report.json", report)
    out.write_text("report.md", report_markdown(report))
    ps, p = report["stages"].get("pseudo_labels", {}), report["paper"]
    bars = [("seed", ps.get("seed_miou"), p["seed_miou"]), ("+CRF", ps.get("crf_miou"), p["crf_miou"]),
            ("mask", ps.get("mask_miou"), p["mask_miou"]),
            ("DeepLab\npseudo", report["val_miou_pseudo_crf"], p["voc_val"]),
            ("DeepLab\nGT", report["val_miou_gt_crf"], p["full_supervision_val_crf"])]
    out.save("report.png", lambda p: save_report_plot(p, bars, report["dataset"]))
