"""Parquet shards from real VOC and COCO files: exact round trips, labels computed independently, reruns, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

from acr.config import SyntheticConfig, load_config
from acr.data.coco import category_map
from acr.data.ingest import TrainRows, make_plan
from acr.data.shards import MANIFEST, ShardIndex, check_manifest, find_corrupt_rows, load_manifest, write_shards
from acr.data.synthetic import generate
from acr.data.voc import VOC_CLASSES, DataError
from tests.conftest import REPO

SMALL = SyntheticConfig(num_classes=4, image_size=64, train_images=12, val_images=4, context_classes=[0])


def _rows(out, manifest, split):
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        rows += pq.read_table(out / shard["file"]).to_pylist()
    return rows


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_voc_mini_round_trip_is_exact(voc_mini, tmp_path):
    before = _listing(voc_mini)
    out = tmp_path / "voc"
    manifest = write_shards("voc", voc_mini, out, 20, shard_rows=4, progress=False)
    assert _listing(voc_mini) == before  # nothing written inside data.root
    assert manifest["splits"]["train"]["rows"] == 9 and manifest["splits"]["val"]["rows"] == 3
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 1]
    assert manifest["class_names"] == VOC_CLASSES and load_manifest(str(out)) == manifest
    for split in ("train", "val"):
        ids = (voc_mini / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        rows = _rows(out, manifest, split)
        assert [r["id"] for r in rows] == ids and [r["index"] for r in rows] == list(range(len(ids)))
        for r in rows:
            assert r["image"] == (voc_mini / "JPEGImages" / f"{r['id']}.jpg").read_bytes()
            gt = np.asarray(Image.open(voc_mini / "SegmentationClass" / f"{r['id']}.png"))
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["mask"]))), gt)
            assert (r["height"], r["width"]) == gt.shape
            # labels, independently: the XML's objects where there is one, else the classes in the mask
            xml = voc_mini / "Annotations" / f"{r['id']}.xml"
            if xml.is_file():
                expect = {VOC_CLASSES.index(o.findtext("name")) for o in ET.parse(xml).getroot().iter("object")}
            else:
                expect = {int(v) - 1 for v in np.unique(gt) if 0 < v < 255}
            assert set(np.nonzero(r["labels"])[0].tolist()) == expect and len(r["labels"]) == 20


def test_coco_mini_masks_and_labels_match_pycocotools(coco_mini, tmp_path):

    manifest = write_shards("coco", coco_mini, tmp_path / "coco", 80, progress=False)
    assert list(manifest["splits"]) == ["val2017"] and manifest["splits"]["val2017"]["rows"] == 10
    coco = COCO(str(coco_mini / "annotations/instances_val2017_mini.json"))
    ids = sorted(c["id"] for c in coco.loadCats(coco.getCatIds()))
    assert manifest["class_names"][0] == "person" and manifest["class_names"][-1] == "toothbrush"
    crowd_pixels = 0
    for r in _rows(tmp_path / "coco", manifest, "val2017"):
        img_id = int(r["id"])
        assert r["image"] == (coco_mini / "val2017" / f"{r['id']}.jpg").read_bytes()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id], iscrowd=None))
        assert set(np.nonzero(r["labels"])[0].tolist()) == {ids.index(a["category_id"]) for a in anns}
        mask = np.asarray(Image.open(io.BytesIO(r["mask"])))
        assert mask.shape == (coco.imgs[img_id]["height"], coco.imgs[img_id]["width"]) == (r["height"], r["width"])
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        cover = np.sum(masks, axis=0)
        for a, m in zip(anns, masks):  # where exactly one annotation covers a pixel, the mask holds its label
            only = m & (cover == 1)
            want = 255 if a["iscrowd"] else ids.index(a["category_id"]) + 1
            assert (mask[only] == want).all()
            crowd_pixels += int(only.sum()) if a["iscrowd"] else 0
        assert (mask[cover == 0] == 0).all()
    assert crowd_pixels > 0  # the fixture's crowd regions were exercised


def test_coco_category_ids_map_to_contiguous_classes():
    cats = [{"id": i} for i in (90, 1, 13, 11, 2)]
    assert category_map(cats) == {1: 1, 2: 2, 11: 3, 13: 4, 90: 5}


def test_rerun_keeps_complete_shards_and_replaces_broken_ones(tmp_path):
    root = generate(SMALL, tmp_path / "data")
    out = tmp_path / "shards"
    m1 = write_shards("synthetic", root, out, 4, shard_rows=5, progress=False)
    files = sorted((out / "train").glob("*.parquet"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    m2 = write_shards("synthetic", root, out, 4, shard_rows=5, progress=False)
    assert m2 == m1 and all(f.stat().st_mtime_ns == stamps[f] for f in files)
    broken = files[1]
    broken.write_bytes(broken.read_bytes()[:300])  # truncated, e.g. by a killed copy
    with pytest.raises(DataError, match=r"shard .*train/part-00001.parquet is 300 bytes.*truncated"):
        check_manifest(m1, str(out), 4, ["train"])
    m3 = write_shards("synthetic", root, out, 4, shard_rows=5, progress=False)
    assert m3 == m1 and files[0].stat().st_mtime_ns == stamps[files[0]]
    check_manifest(m3, str(out), 4, ["train", "val"], require_masks=["val"])
    with pytest.raises(DataError, match="has 4 classes but the config says 5"):
        check_manifest(m3, str(out), 5, ["train"])
    with pytest.raises(DataError, match="inside data.root"):
        write_shards("synthetic", root, root / "shards", 4, progress=False)


def test_corrupt_source_image_stops_or_is_skipped(tmp_path):
    root = generate(SMALL, tmp_path / "data")
    bad = root / "JPEGImages/train_00002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="train_00002.jpg.*data.skip_corrupt"):
        write_shards("synthetic", root, tmp_path / "a", 4, progress=False)
    m = write_shards("synthetic", root, tmp_path / "b", 4, skip_corrupt=True, progress=False)
    assert m["splits"]["train"]["rows"] == 11 and [s["id"] for s in m["splits"]["train"]["skipped"]] == ["train_00002"]
    index = ShardIndex(m, "train")
    assert 2 not in index.indices.tolist() and index.locate(3) == (0, 2)


def corrupt_one_row(out, manifest, split, row_id):
    """Replace one row's image bytes by garbage in its shard, keeping the manifest consistent (a bad upstream copy)."""
    for shard in manifest["splits"][split]["shards"]:
        path = out / shard["file"]
        table = pq.read_table(path)
        ids = table.column("id").to_pylist()
        if row_id in ids:
            rows = table.to_pylist()
            rows[ids.index(row_id)]["image"] = b"\xff\xd8 not a jpeg"
            pq.write_table(table.from_pylist(rows, schema=table.schema), path, row_group_size=1)
            shard["bytes"] = path.stat().st_size
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_undecodable_row_is_named_by_shard_and_id(tmp_path):

    root = generate(SMALL, tmp_path / "data")
    out = tmp_path / "shards"
    m = write_shards("synthetic", root, out, 4, shard_rows=5, progress=False)
    corrupt_one_row(out, m, "train", "train_00006")
    bad = find_corrupt_rows(str(out), m, "train")
    assert [(b["id"], b["index"], b["shard"]) for b in bad] == [("train_00006", 6, "train/part-00001.parquet")]
    cfg = load_config(None, ["synthetic.num_classes=4", "train.batch_size=4", "augment.crop_size=32",
                             "method.srf.grid_size=4", "model.decoder_depth=5"])
    plan = make_plan(ShardIndex(m, "train").indices, cfg, 1)
    rows = TrainRows(str(out), m, plan.to_dict(), 4, dict(resize_mode="scale", resize_range=[1, 1], crop_size=32,
                                                          flip=False), 4)
    ok = rows.decode(np.array([0, 0]), np.array([5, 7]))
    assert ok["image"].shape == (2, 3, 32, 32) and ok["index"].tolist() == [5, 7]
    with pytest.raises(DataError, match=r"row id 'train_00006' of shard .*train/part-00001.parquet"):
        rows.decode(np.array([0]), np.array([6]))
    # keyed randomness: the same (epoch, index) gives the same item, another epoch another augmentation
    cfg_aug = dict(resize_mode="scale", resize_range=[0.5, 1.5], crop_size=32, flip=True)
    rows = TrainRows(str(out), m, plan.to_dict(), 4, cfg_aug, 4)
    a, b, c = (rows.decode(np.array([e]), np.array([5])) for e in (2, 2, 3))
    assert all(np.array_equal(a[k], b[k]) for k in ("image", "target_u", "grid_u"))
    assert not np.array_equal(a["image"], c["image"])


def test_prepare_script_writes_manifest_and_refuses_output_inside_root(voc_mini, tmp_path):


    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "ray_jobs/prepare_data.py", "--output-dir", str(out), "data.format=voc",
                           f"data.root={voc_mini}"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / MANIFEST).read_text())
    assert {k: v["rows"] for k, v in m["splits"].items()} == {"train": 9, "trainval": 12, "val": 3}
    proc = subprocess.run([sys.executable, "ray_jobs/prepare_data.py", "--output-dir", str(voc_mini / "x"),
                           "data.format=voc", f"data.root={voc_mini}"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert proc.returncode == 1 and "inside data.root" in proc.stderr
    assert not (voc_mini / "x").exists()
