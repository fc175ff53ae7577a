"""The embedded dataset, the VOC reader on real VOC files, transforms, keyed randomness, and bad input."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from acr.config import SyntheticConfig
from acr.data.synthetic import ensure_synthetic, generate
from acr.data.transforms import random_crop
from acr.data.voc import VOC_CLASSES, DataError, load_image, load_mask, read_voc_split

SMALL = SyntheticConfig(num_classes=4, image_size=64, train_images=12, val_images=4, context_classes=[0])


def test_synthetic_is_deterministic_and_voc_shaped(tmp_path):
    a, b = generate(SMALL, tmp_path / "a"), generate(SMALL, tmp_path / "b")
    for sub in ("JPEGImages/train_00003.jpg", "SegmentationClass/train_00003.png", "Annotations/val_00001.xml"):
        assert (a / sub).read_bytes() == (b / sub).read_bytes()
    mask_img = Image.open(a / "SegmentationClass/train_00003.png")
    assert mask_img.mode == "P" and mask_img.size == (64, 64)
    recs = read_voc_split(a, "train", 4)
    assert len(recs) == 12 and len(read_voc_split(a, "val", 4)) == 4
    voids = 0
    for r in recs:  # XML labels equal the classes drawn in the mask; every object has a void border
        m = load_mask(r.mask_path, 4)
        assert tuple(int(v) - 1 for v in np.unique(m) if 0 < v < 255) == r.classes
        voids += int((m == 255).sum() > 0)
    assert voids == 12


def test_synthetic_context_band_cooccurs_with_its_class(tmp_path):
    cfg = SyntheticConfig(num_classes=4, image_size=64, train_images=60, val_images=0, context_classes=[0],
                          context_probability=1.0, max_objects=1)
    root = generate(cfg, tmp_path / "ctx")
    # the context band (bottom rows for context class 0) is background in the GT and differs in colour
    with_cls, without = [], []
    for r in read_voc_split(root, "train", 4):
        img = load_image(r.image_path).astype(float)
        m = load_mask(r.mask_path, 4)
        bottom = (m[-6:] == 0)
        blue = (img[-6:, :, 2] - img[-6:, :, 0])[bottom].mean() if bottom.any() else np.nan
        (with_cls if 0 in r.classes else without).append(blue)
    assert np.nanmean(with_cls) > np.nanmean(without) + 20


def test_ensure_synthetic_generates_once(tmp_path):
    p1 = ensure_synthetic(SMALL, str(tmp_path))
    stamp = (p1 / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic(SMALL, str(tmp_path)) == p1
    assert (p1 / "synthetic.json").stat().st_mtime_ns == stamp


def test_voc_mini_labels_from_xml_and_masks(voc_mini):
    truth = json.loads((voc_mini / "image_labels.json").read_text())
    recs = read_voc_split(voc_mini, "train", 20)
    assert len(recs) == 9 and len(read_voc_split(voc_mini, "val", 20)) == 3
    for r in recs:  # labels=auto: XML where present (2007_000063), else the mask
        assert [c + 1 for c in r.classes] == sorted(truth[r.id]["class_ids_in_mask"])
    dog_chair = next(r for r in recs if r.id == "2007_000063")
    assert [VOC_CLASSES[c] for c in dog_chair.classes] == ["chair", "dog"]
    m = load_mask(dog_chair.mask_path, 20)
    assert m.shape == (375, 500) and (m == 255).any() and set(np.unique(m)) <= {0, 9, 12, 255}


def test_voc_labels_file_json(voc_mini, tmp_path):
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"2007_000039": [20], "2007_000063": [9, 12]}))
    root = tmp_path / "voc"
    shutil.copytree(voc_mini, root)
    (root / "ImageSets/Segmentation/two.txt").write_text("2007_000039\n2007_000063\n")
    recs = read_voc_split(root, "two", 20, labels="file", labels_file=str(f))
    assert [r.classes for r in recs] == [(19,), (8, 11)]


def test_random_crop_pads_with_zero_and_keeps_content():
    img = np.arange(1, 7, dtype=np.float32).reshape(2, 3, 1)
    out = random_crop(img, np.random.default_rng(0), 4)
    assert out.shape == (4, 4, 1) and out.sum() == img.sum() and (out == 0).sum() == 16 - 6


def test_corrupt_jpeg_names_the_file(tmp_path):
    root = generate(SMALL, tmp_path / "c")
    bad = root / "JPEGImages/train_00002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="train_00002.jpg"):
        load_image(bad)


def test_mask_with_class_beyond_count_names_file_and_value(tmp_path):
    root = generate(SMALL, tmp_path / "m")
    p = root / "SegmentationClass/train_00001.png"
    m = np.array(Image.open(p))
    m[0, 0] = 9
    im = Image.fromarray(m, mode="P")
    im.putpalette(Image.open(p).getpalette())
    im.save(p)
    with pytest.raises(DataError, match=r"train_00001.png has class id\(s\) \[9\] beyond the class count 4"):
        read_voc_split(root, "train", 4, labels="masks")


def test_image_without_label_names_the_id(tmp_path):
    root = generate(SMALL, tmp_path / "n")
    (root / "Annotations/train_00004.xml").write_text("<annotation></annotation>")
    with pytest.raises(DataError, match="image 'train_00004' has no label"):
        read_voc_split(root, "train", 4)


def test_wrong_class_count_is_reported(voc_mini):
    with pytest.raises(DataError, match="defines 20 classes .* data.num_classes=21"):
        read_voc_split(voc_mini, "train", 21)
