"""DeepLab on pseudo-labels: the pieces with hand-computed values (loss with 255 ignored, paired crop padding,
multi-scale + flip probabilities, poly LR, the torchvision DeepLabV3 and ResNet-38 paths), and bad label maps named
before any worker starts. ray_jobs/segment.py itself on the real VOC images of ../shared/data/voc_mini, evaluated,
interrupted and resumed on S3: tests/test_stage_fault_tolerance.py."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from acr.config import ConfigError, load_config
from acr.data.transforms import normalize, scale_flip_crop_pair
from acr.data.voc import DataError
from acr.method.schedules import poly_factor
from acr.segment.job import run_segment
from acr.segment.train_deeplab import segmentation_loss
from acr.models.deeplab import DeepLab, predict_probabilities
from tests.conftest import REPO

TINY = ["data.format=voc", "segment.backbone=resnet18", "segment.output_stride=16", "segment.epochs=1",
        "segment.max_steps_per_epoch=2", "segment.batch_size=2", "segment.crop_size=64", "segment.scale_range=[0.2,0.3]",
        "segment.eval_scales=[0.5,1.0]", "segment.actors=1", "segment.overlays=2", "model.backbone=resnet18"]


# ----------------------------------------------------------------------------------------------------------------
# pieces


def test_loss_ignores_255_and_is_zero_without_labelled_pixels():
    logits = torch.tensor([[[[0.0, 5.0]], [[0.0, -5.0]]]], requires_grad=True)  # (1, 2 classes, 1, 2 pixels)
    loss = segmentation_loss(logits, torch.tensor([[[0, 255]]]))
    assert loss.item() == pytest.approx(math.log(2))  # only the first pixel: softmax (0.5, 0.5), -log 0.5
    loss.backward()
    assert logits.grad[..., 1].abs().max() == 0  # the ignored pixel gets no gradient
    none = segmentation_loss(logits, torch.full((1, 1, 2), 255))
    assert none.item() == 0.0 and torch.isfinite(none)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 5, 5, generator=g), torch.randint(0, 4, (2, 5, 5), generator=g)
    y[0, :2] = 255
    assert segmentation_loss(x, y).item() == pytest.approx(
        nn.functional.cross_entropy(x, y, ignore_index=255).item(), rel=1e-6)


def test_crop_pads_image_with_the_mean_colour_and_label_with_255():
    raw = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [200, 210, 220]]], np.uint8)
    label = np.array([[1, 2], [3, 4]], np.uint8)
    image, lab = scale_flip_crop_pair(raw, label, np.random.default_rng(0), [1.0, 1.0], 4, flip=False)
    assert image.shape == (3, 4, 4) and lab.shape == (4, 4) and lab.dtype == np.uint8
    inside = lab != 255
    assert inside.sum() == 4 and sorted(lab[inside].tolist()) == [1, 2, 3, 4]
    assert (image[:, ~inside] == 0).all()  # padding: 0 after normalisation, i.e. the ImageNet mean colour
    norm = normalize(raw)
    for k, (r, c) in {1: (0, 0), 2: (0, 1), 3: (1, 0), 4: (1, 1)}.items():  # each label stays on its own pixel
        (y,), (x,) = np.nonzero(lab == k)
        assert np.allclose(image[:, y, x], norm[r, c])
    flipped = [scale_flip_crop_pair(raw, label, np.random.default_rng(s), [1.0, 1.0], 2) for s in range(8)]
    assert {tuple(lab[0].tolist()) for _, lab in flipped} == {(1, 2), (2, 1)}  # both orientations occur
    for image, lab in flipped:  # image and label flipped together
        (y,), (x,) = np.nonzero(lab == 2)
        assert np.allclose(image[:, y, x], norm[0, 1])
    big, lab2 = scale_flip_crop_pair(raw, label, np.random.default_rng(0), [2.0, 2.0], 3, flip=False)
    assert (lab2 != 255).all() and np.bincount(lab2.ravel(), minlength=5)[1:].sum() == 9  # 4x4 image, 3x3 crop


class Ramp(nn.Module):
    """Class-0 logit = the column index, class-1 logit = 0: p(class 0) at column j is sigmoid(j); not symmetric."""

    def forward(self, x):
        b, _, h, w = x.shape
        ramp = torch.arange(w, dtype=x.dtype).expand(b, 1, h, w)
        return torch.cat([ramp, torch.zeros_like(ramp)], 1)


def test_flip_averages_the_flipped_prediction_mirrored_back():
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    single, multi = predict_probabilities(Ramp(), torch.zeros(3, 2, 4), [1.0], flip=True)
    assert single[0, 0].tolist() == pytest.approx([sig(j) for j in range(4)])  # 0.5, 0.731, 0.881, 0.953
    expected = [(sig(j) + sig(3 - j)) / 2 for j in range(4)]  # 0.726, 0.806, 0.806, 0.726
    assert multi[0, 0].tolist() == pytest.approx(expected) and multi[1, 0].tolist() == pytest.approx(
        [1 - e for e in expected])
    _, no_flip = predict_probabilities(Ramp(), torch.zeros(3, 2, 4), [1.0], flip=False)
    assert torch.allclose(no_flip, single)
    # a pointwise model on a constant image: every scale and the flip give the same probabilities
    conv = nn.Conv2d(3, 3, 1)
    image = torch.ones(3, 6, 10) * torch.tensor([0.3, -1.0, 2.0])[:, None, None]
    single, multi = predict_probabilities(conv, image, [0.5, 1.0, 2.0], flip=True)
    assert single.shape == multi.shape == (3, 6, 10) and torch.allclose(single, multi, atol=1e-6)
    assert torch.allclose(multi.sum(0), torch.ones(6, 10))
    single_only, _ = predict_probabilities(conv, image, [0.5], flip=False)  # scale 1 not among the scales
    assert torch.allclose(single_only, single, atol=1e-6)


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """DeepLab's learning rate at `step` (the one poly schedule, acr.method.schedules)."""
    return base_lr * poly_factor(step, total_steps, power)


def test_poly_lr():
    assert poly_lr(0.001, 0, 10, 0.9) == 0.001
    assert poly_lr(0.001, 5, 10, 0.9) == pytest.approx(0.001 * 0.5 ** 0.9)  # 5.359e-4
    assert poly_lr(0.01, 3, 4, 1.0) == pytest.approx(0.0025)
    assert poly_lr(0.01, 99, 4, 1.0) == pytest.approx(0.0025)  # never below the last step's rate


def test_aspp_v3_on_resnet50_is_torchvisions_deeplabv3_with_imagenet_weights_from_a_file(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(imagenet, tmp_path / "resnet50.pth")
    ours = DeepLab("resnet50", 21, "aspp_v3", 8, pretrained=str(tmp_path / "resnet50.pth")).eval()
    assert torch.equal(ours.backbone.layer4[2].conv3.weight, imagenet["layer4.2.conv3.weight"])
    theirs = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                num_classes=21).eval()
    theirs.load_state_dict({k.replace("head.", "classifier.", 1): v for k, v in ours.state_dict().items()})
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x)["out"], atol=1e-4)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth does not fit backbone resnet50"):
        DeepLab("resnet50", 21, "aspp_v3", 8, pretrained=str(tmp_path / "bad.pth"))


def test_resnet38d_with_the_deeplab_v2_head():
    model = DeepLab("resnet38d", 21, "aspp_v2", 8)
    assert [c.dilation for c in model.head.convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(c.in_channels == 4096 for c in model.head.convs)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 24, 32)).shape == (1, 21, 24, 32)
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))  # frozen BN
    backbone, head = model.param_groups(0.001, 10.0)
    assert (backbone["lr"], head["lr"]) == (0.001, pytest.approx(0.01))
    assert len(head["params"]) == 8 and all(p.requires_grad for p in backbone["params"])
    with pytest.raises(ConfigError, match="segment.backbone=resnet38d has output stride 8 only"):
        load_config(None, ["segment.output_stride=16"], job="segment")


# ----------------------------------------------------------------------------------------------------------------
# the job


def _labels_from_gt(voc_mini: Path, folder: Path) -> Path:
    """The ground-truth masks of the train split as a folder of label maps (palette PNGs with 255 borders)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in (voc_mini / "ImageSets/Segmentation/train.txt").read_text().split():
        shutil.copy(voc_mini / "SegmentationClass" / f"{i}.png", folder / f"{i}.png")
    return folder


def test_bad_label_maps_are_named_before_training(voc_mini, cache_dir, tmp_path):
    labels = _labels_from_gt(voc_mini, tmp_path / "labels")
    first = sorted(labels.glob("*.png"))[0]
    cfg = load_config(REPO / "configs/demo.yaml", TINY + [f"data.root={voc_mini}", f"data.cache_dir={cache_dir}",
                                                          f"segment.labels={labels}"])
    run = lambda: run_segment(cfg, tmp_path / "out")  # noqa: E731
    Image.fromarray(np.full((10, 12), 1, np.uint8), mode="L").save(first)
    with pytest.raises(DataError, match=rf"{first.name}: label map is 12x10 \(w x h\), the image is"):
        run()
    with Image.open(voc_mini / "SegmentationClass" / first.name) as im:
        bad = np.asarray(im).copy()
    bad[0, 0] = 30
    Image.fromarray(bad, mode="L").save(first)
    with pytest.raises(DataError, match=rf"{first.name}: class id\(s\) \[30\] beyond the class count 20"):
        run()
    Image.fromarray(np.zeros(bad.shape + (3,), np.uint8)).save(first)
    with pytest.raises(DataError, match=rf"{first.name}: a label map must be a palette or greyscale PNG"):
        run()
    first.unlink()
    with pytest.raises(DataError, match=rf"no label map <id>.png for 1 of the 9 training images .*{first.stem}"):
        run()
    with pytest.raises(ConfigError, match="segment.labels=/nonexistent: not a folder"):
        run_segment(load_config(REPO / "configs/demo.yaml", TINY + [f"data.root={voc_mini}",
                                                                    "segment.labels=/nonexistent"]), tmp_path / "o")
    assert not (tmp_path / "out" / "model").exists()  # nothing started
