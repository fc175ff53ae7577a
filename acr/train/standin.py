"""The project's stand-in for ImageNet weights: the embedded default's backbone pre-trained as a plain classifier on a
synthetic image set disjoint from the one ACR trains on, written as an ordinary weights file.

The paper's regime is ImageNet initialisation; offline there are no ImageNet weights, and from random initialisation
the embedded default's classifier does not localise anything within a CPU budget (its CAMs fire on background).
`model.pretrained: standin` (and `segment.pretrained: standin`) names this file: it is made on first use (with a
progress bar), cached beside the synthetic dataset under a name keyed by what it depends on (the generator version,
the backbone, the whole resolved recipe), and then taken exactly as real ImageNet weights are
(acr.models.weights.load_backbone_weights). `python ray_jobs/standin.py` makes it ahead of time.
Each job resolves it after checking its data (acr.train.job.resolve_pretrained).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray
from tqdm import tqdm

from acr.checkpoint import export_backbone
from acr.config import Config, apply_overrides, config_from_dict, to_dict
from acr.data.synthetic import GENERATOR_VERSION, default_cache_dir
from acr.registry import BACKBONES

log = logging.getLogger(__name__)

STANDIN = "standin"  # the value of model.pretrained / segment.pretrained that names the stand-in
# The source task: the same classes and image statistics as the embedded default, other images (another seed, twice
# as many), classification only, BatchNorm learning (its statistics are what a frozen-BN run later uses).
RECIPE = {"method.reconstructor": "none", "synthetic.seed": 101, "synthetic.train_images": 640,
          "model.freeze_bn": False, "optim.lr": 0.05, "train.epochs": 6, "eval.enabled": False,
          "model.pretrained": None, "train.log_every_steps": 0, "train.checkpoint_every_steps": 0,
          # fp32 whatever the job's train.precision, as ImageNet weights are one file for every job and machine: a
          # stand-in pre-trained in bf16 depends on the CPU's bf16 kernels, and so does the demo's CAM with it.
          "train.precision": "fp32"}
# A ViT (MCTformer-v2 trained as a classifier, acr.models.mctformer) with its optimiser, AdamW (MCTformer main.py:
# lr 5e-4 for batch 512; here batch 8 from scratch, where 5e-4 trains and the scaled 8e-6 does not move).
VIT_RECIPE = {"optim.classifier_optimizer": "adamw", "optim.lr": 5e-4, "model.vit.encoder_pretrained": None}
# The ViT's map choices (the map ACR decomposes, the map of inference and its refinement): the pre-training is
# classification only, no map enters its loss, so they cannot change the weights; taken at their defaults, so that
# runs differing only in them share one stand-in.
VIT_MAP_ONLY = ("train_cam", "cam", "attention_layers", "affinity_refine")


def recipe_config(cfg: Config, backbone: str | None = None, epochs: int | None = None) -> Config:
    """The pre-training run's config: the defaults with RECIPE, and from `cfg` only what the weights must fit (the
    synthetic images' classes and size, the model, the augmentation, the batch and the step cap), so that every job
    of the embedded default shares one file. The backbone and the number of epochs may be given (DeepLab's backbone,
    the ablations' pre-training length)."""
    tree, user = to_dict(Config()), to_dict(cfg)
    for section in ("synthetic", "model", "augment"):
        tree[section] = user[section]
    tree["data"]["cache_dir"] = user["data"]["cache_dir"]
    for key in ("batch_size", "max_steps_per_epoch", "threads_per_worker", "channels_last"):
        tree["train"][key] = user["train"][key]
    default_vit = to_dict(Config())["model"]["vit"]
    if not BACKBONES[backbone or cfg.model.backbone].transformer:  # a CNN's recipe: the ViT's settings do not enter it
        tree["model"]["vit"] = default_vit
    else:
        tree["model"]["vit"].update({k: default_vit[k] for k in VIT_MAP_ONLY})
    extra = {"model.backbone": backbone} if backbone else {}
    if epochs is not None:
        extra["train.epochs"] = epochs
    recipe = apply_overrides(config_from_dict(tree), {**RECIPE, **extra, "data.format": "synthetic"})
    return apply_overrides(recipe, VIT_RECIPE) if BACKBONES[recipe.model.backbone].transformer else recipe


# Settings that cannot change the weights (tested to give the same step bit for bit), left out of the cache key so
# that adding them did not invalidate the stand-ins already cached.
NOT_IN_KEY = (("train", "share_classifier_trunk"),)
# Settings added after stand-ins were cached: in the key only where they differ from their default, so that adding
# them did not invalidate the stand-ins already cached (a value that changes the weights still changes the key).
ADDED_LATER = (("model", "vit", "encoder"), ("model", "vit"), ("optim", "classifier_optimizer"),
               ("optim", "adamw_weight_decay"), ("pseudo", "irn_backbone"), ("optim", "lr_schedule"),
               ("optim", "warmup_epochs"), ("optim", "warmup_lr"), ("optim", "min_lr"), ("ray", "shared_dirs"))


def standin_path(recipe: Config) -> Path:
    """Where the stand-in of `recipe` is cached: keyed by the generator version and the whole recipe (but not where
    the data is cached, nor NOT_IN_KEY)."""
    shaping = to_dict(recipe)
    shaping["data"].pop("cache_dir")
    for section, key in NOT_IN_KEY:
        shaping[section].pop(key)
    defaults = to_dict(Config())
    for path in ADDED_LATER:  # a key path: a nested key first, then its section
        own, default = shaping, defaults
        for k in path[:-1]:
            own, default = own.get(k, {}), default[k]
        if path[-1] in own and own[path[-1]] == default[path[-1]]:
            own.pop(path[-1])
            default.pop(path[-1])  # so that its section compares with the default as it stood
    key = hashlib.sha256(json.dumps({"generator": GENERATOR_VERSION, "recipe": shaping}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    return default_cache_dir(recipe.data.cache_dir) / "backbones" / f"{recipe.model.backbone}-standin-{key}.pth"


def standin_weights(cfg: Config, train: Callable, backbone: str | None = None, epochs: int | None = None) -> Path:
    """The stand-in weights file for `cfg`, made now with `train(cfg, folder, on_report=...)` (the plain training
    loop, acr.train.job.run_local) if it is not cached."""
    recipe = recipe_config(cfg, backbone, epochs)
    out = standin_path(recipe)
    if out.is_file():
        log.info("stand-in ImageNet weights (cached): %s", out)
        return out
    r = recipe.train
    log.info("pre-training the stand-in for ImageNet weights (%s, %d epochs on %d other synthetic images; once, then "
             "cached): %s", recipe.model.backbone, r.epochs, recipe.synthetic.train_images, out)
    own_ray = not ray.is_initialized()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=r.epochs, desc="stand-in pre-training",
                                                    unit="epoch") as bar:
        session = train(recipe, Path(tmp) / "run", on_report=lambda metrics: bar.update(1))
        path = export_backbone(session.last_checkpoint, out)
    if own_ray:  # the job then starts the Ray its own work needs (a search's trial slots, a pipeline's CPUs)
        ray.shutdown()
    return path


def resolve_standin(cfg: Config, train: Callable, model: bool = True, segment: bool = False) -> Config:
    """`cfg` with `model.pretrained` (and with `segment`, `segment.pretrained`) = "standin" replaced by the
    stand-in's file: each job resolves the networks it builds (acr.train.job.resolve_pretrained)."""
    changes = {}
    if model and cfg.model.pretrained == STANDIN:
        changes["model.pretrained"] = str(standin_weights(cfg, train))
    if model and BACKBONES[cfg.model.backbone].transformer and cfg.model.vit.encoder == "cnn" \
            and cfg.model.vit.encoder_pretrained == STANDIN:
        changes["model.vit.encoder_pretrained"] = str(standin_weights(cfg, train, backbone=cfg.model.vit.encoder_backbone))
    if segment and cfg.segment.pretrained == STANDIN:
        changes["segment.pretrained"] = str(standin_weights(cfg, train, backbone=cfg.segment.backbone))
    return apply_overrides(cfg, changes) if changes else cfg
