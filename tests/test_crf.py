import numpy as np

from acr.data.voc import load_image
from acr.refine.crf import crf_from_cams, crf_from_labels, crf_inference


def test_crf_keeps_only_labelled_classes_and_follows_colour_edges(voc_mini):
    img = load_image(voc_mini / "JPEGImages/2007_000063.jpg")  # real JPEG, read-only array from PIL
    h, w = img.shape[:2]
    cams = np.zeros((20, h, w), np.float32)
    cams[8, :, : w // 2] = 0.9  # chair on the left
    cams[11, :, w // 2:] = 0.9  # dog on the right
    cams[3] = 1.0  # an absent class with a strong CAM must never appear
    labels = np.zeros(20)
    labels[[8, 11]] = 1
    out = crf_from_cams(img, cams, labels, alpha=6)
    assert out.shape == (h, w) and set(np.unique(out)) <= {0, 9, 12}
    assert (out[:, : w // 4] == 9).mean() > 0.5 and (out[:, -w // 4:] == 12).mean() > 0.5


def test_crf_smooths_a_noisy_unary_on_a_two_colour_image():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255
    rng = np.random.default_rng(0)
    p = np.where(np.arange(40)[None, :] < 20, 0.7, 0.3) + rng.uniform(-0.25, 0.25, (40, 40))
    probs = np.stack([p, 1 - p]).astype(np.float32)
    noisy_errors = (probs.argmax(0) != (np.arange(40)[None, :] >= 20)).sum()
    refined = crf_inference(img, probs).argmax(0)
    assert noisy_errors > 0 and (refined != (np.arange(40)[None, :] >= 20)).sum() == 0


def test_crf_from_labels_keeps_only_the_input_labels_and_cleans_noise():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255
    truth = np.where(np.arange(40)[None, :] < 20, 0, 2).repeat(40, 0)
    noisy = truth.copy()
    flip = np.random.default_rng(0).random((40, 40)) < 0.15
    noisy[flip] = 2 - noisy[flip]  # 0 <-> 2; labels 1 and 3 never appear
    out = crf_from_labels(img, noisy, n_labels=4)
    assert out.shape == (40, 40) and set(np.unique(out)) == {0, 2}
    assert (noisy != truth).sum() > 100 and (out != truth).sum() == 0
    assert (crf_from_labels(img, np.zeros((40, 40), np.int64), n_labels=1) == 0).all()
