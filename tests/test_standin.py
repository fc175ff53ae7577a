"""The stand-in for ImageNet weights (acr/train/standin.py): made on first use, cached under a name keyed by its
recipe, reused without training again, and taken through the same loader as real ImageNet weights."""

from __future__ import annotations

import pytest
import torch

from acr.config import apply_overrides, load_config
from acr.errors import WeightsError
from acr.models.factory import build_classifier
from acr.train.job import resolve_pretrained
from acr.train.standin import RECIPE, recipe_config, standin_path
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow


def test_the_standin_is_made_once_cached_and_loads_as_imagenet_weights(cache_dir):
    # the recipe's epochs of at most 2 steps of 4 images: a small stand-in, made by the real code path
    cfg = load_config(None, TINY_OVERRIDES + [f"data.cache_dir={cache_dir}", "train.max_steps_per_epoch=2",
                                              "train.batch_size=4", "model.pretrained=standin"])
    assert resolve_pretrained(cfg, model=False) is cfg  # a job that does not build this network leaves it
    expected = standin_path(recipe_config(cfg))
    assert not expected.exists()
    resolved = resolve_pretrained(cfg)
    path = expected
    assert resolved.model.pretrained == str(path) and path.is_file() and path.parent == cache_dir / "backbones"
    assert path.name.startswith("resnet18-standin-")
    made = path.stat().st_mtime_ns
    assert resolve_pretrained(cfg).model.pretrained == str(path)  # the second time: the cached file, not rebuilt
    assert path.stat().st_mtime_ns == made
    # the key follows the recipe, not where it is cached or how the job is scaled
    assert standin_path(recipe_config(cfg, epochs=RECIPE["train.epochs"] + 1)) != path
    assert standin_path(recipe_config(apply_overrides(cfg, {"scaling.num_workers": 2, "tune.num_samples": 3}))) == path
    assert standin_path(recipe_config(apply_overrides(cfg, {"train.share_classifier_trunk": False}))) == path
    # the same loader as ImageNet weights: the backbone holds exactly the file's tensors (BN statistics included)
    weights = torch.load(path, map_location="cpu")
    model = build_classifier(resolved)
    own = model.backbone.state_dict()
    assert weights and all(torch.equal(own[k], v) for k, v in weights.items())
    assert any("running_mean" in k and not torch.all(v == 0) for k, v in weights.items())  # BN learnt its statistics
    with pytest.raises(WeightsError, match="stand-in for ImageNet weights: the job resolves it"):
        build_classifier(cfg)  # unresolved: a clear error, not "file not found: standin"


def test_config_keys_added_at_their_defaults_keep_the_cached_standins():
    # The demo stand-ins' cache keys as users have them cached: a new config key at its default must not rebuild
    # them; a recipe change that alters the weights updates these names on purpose.
    assert standin_path(recipe_config(load_config("configs/demo.yaml", []))).name == "resnet18-standin-880b0acdd3e5.pth"
    assert standin_path(recipe_config(load_config("configs/demo_vit.yaml", []))).name == \
        "deit_tiny-standin-a0a27be93f4a.pth"
