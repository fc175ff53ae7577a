import numpy as np
import pytest
import torch

from acr.cam import floor_confusions, infer_cams
from acr.metrics import Confusions, best_threshold, confusion_matrix, scores, threshold_sweep_confusion
from acr.models.classifier import Classifier


def test_confusion_and_scores_by_hand():
    gt = np.array([[0, 0, 1, 1], [0, 255, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.sum() == 7  # 8 pixels, the one labelled 255 ignored
    assert conf.tolist() == [[1, 1, 1], [0, 2, 0], [1, 0, 1]]  # rows: ground truth, columns: prediction
    s = scores(conf)
    # IoU: bg 1/(3+2-1)=0.25, c1 2/(2+3-2)=2/3, c2 1/(2+2-1)=1/3
    assert s["iou"] == pytest.approx([0.25, 2 / 3, 1 / 3])
    assert s["miou"] == pytest.approx((0.25 + 2 / 3 + 1 / 3) / 3)
    assert s["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert s["recall"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)


def test_the_confusion_accumulator_sums_images_and_workers():
    gt = np.array([[0, 0, 1, 1], [0, 255, 2, 2]])
    acc = Confusions(3, ("seed",))
    acc.add("seed", np.array([[0, 1, 1, 1], [2, 0, 2, 0]]), gt)
    acc.add("seed", np.zeros((2, 4), np.int64), gt)  # a second image: everything background
    assert acc.matrices["seed"].tolist() == [[4, 1, 1], [2, 2, 0], [3, 0, 1]]
    acc.add_matrix("sweep", np.ones((2, 3, 3), np.int64))
    acc.reduce(lambda a: a * 2)  # e.g. two workers holding the same matrices
    assert acc.matrices["seed"].sum() == 28 and acc.matrices["sweep"].shape == (2, 3, 3)
    assert acc.scores("seed")["iou"][0] == pytest.approx(8 / (12 + 18 - 8))  # TP / (GT + Pred - TP)
    assert [s["miou"] for s in acc.sweep("sweep")] == pytest.approx([2 / 10, 2 / 10])


def test_threshold_sweep_matches_explicit_argmax():
    rng = np.random.default_rng(0)
    cams = rng.random((3, 5, 6)).astype(np.float32)
    gt = rng.integers(0, 4, size=(5, 6))
    ts = np.array([0.2, 0.5, 0.8])
    sweep = threshold_sweep_confusion(cams, gt, ts)
    for t, conf in zip(ts, sweep):
        full = np.concatenate([np.full((1, 5, 6), t), cams])
        assert np.array_equal(conf, confusion_matrix(full.argmax(0), gt, 4))


def test_threshold_sweep_by_hand_with_ties_and_ignored_pixels():
    # 4 pixels, 2 classes: largest CAMs 0.3 (class 1), 0.5 (class 2, exactly a threshold), 0.9 (class 1), ignored
    cams = np.array([[[0.3, 0.1, 0.9, 0.9]], [[0.2, 0.5, 0.0, 0.0]]], np.float32)
    gt = np.array([[1, 2, 0, 255]])
    sweep = threshold_sweep_confusion(cams, gt, np.array([0.1, 0.5, 0.95]))
    want_01 = np.zeros((3, 3), np.int64)
    want_01[1, 1] = want_01[2, 2] = want_01[0, 1] = 1  # every pixel above 0.1
    want_05 = np.zeros((3, 3), np.int64)
    want_05[1, 0] = want_05[2, 0] = want_05[0, 1] = 1  # 0.3 and 0.5 are not above 0.5: background
    want_095 = np.zeros((3, 3), np.int64)
    want_095[1, 0] = want_095[2, 0] = want_095[0, 0] = 1  # nothing above 0.95
    assert np.array_equal(sweep, np.stack([want_01, want_05, want_095]))
    with pytest.raises(ValueError, match="increasing"):
        threshold_sweep_confusion(cams, gt, np.array([0.5, 0.1]))


def test_the_best_threshold_says_when_it_lies_at_an_end_of_the_range():
    ts = [0.1, 0.2, 0.3, 0.4]
    assert best_threshold(ts, [0.2, 0.5, 0.4, 0.1], "t") == {"index": 1, "threshold": 0.2, "threshold_at_edge": None,
                                                        "threshold_range": [0.1, 0.4]}
    assert best_threshold(ts, [0.6, 0.5, 0.4, 0.1], "t")["threshold_at_edge"] == "low"
    assert best_threshold(ts, [0.1, 0.2, 0.3, 0.4], "t")["threshold_at_edge"] == "high"
    assert best_threshold(ts, [0.1, 0.2, 0.3, 0.4], "t")["threshold"] == 0.4


def test_floors():
    gt = np.array([[0, 0, 2, 2]])
    bg, whole = floor_confusions(np.array([0.0, 1.0]), gt)
    assert scores(bg)["miou"] == pytest.approx(0.5 / 2)  # bg IoU 0.5; class 2 IoU 0 (class 1 unseen)
    assert scores(whole)["iou"] == [0.0, None, 0.5]


def test_infer_cams_is_flip_equivariant_and_zero_for_absent_classes():
    torch.manual_seed(0)
    net = Classifier("resnet18", 3, output_stride=16, dropout=False).eval()
    for conv in net.cam_head[::2]:
        conv.weight.data.abs_()  # a positive CAM everywhere, so that max-normalisation reaches 1
    img = torch.randn(3, 48, 64)
    labels = torch.tensor([1.0, 0.0, 1.0])
    cams = infer_cams(net, img, labels, scales=[0.5, 1.0], flip=True)
    flipped = infer_cams(net, img.flip(-1), labels, scales=[0.5, 1.0], flip=True)
    assert cams.shape == (3, 48, 64)
    assert torch.allclose(cams, flipped.flip(-1), atol=1e-5)
    assert cams[1].abs().sum() == 0 and cams.min() >= 0 and cams.max() <= 1
    assert cams[0].max() == pytest.approx(1.0, abs=1e-4) and cams[2].max() == pytest.approx(1.0, abs=1e-4)
