"""The pseudo-label job's pieces: checkpoint lookup and the job's config, files made with other settings, the
per-image steps on hand-made CAMs. The job itself, end to end on the real VOC images of ../shared/data/voc_mini,
interrupted and resumed on S3: tests/test_stage_fault_tolerance.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from acr.checkpoint import resolve_checkpoint, save_state
from acr.config import Config, ConfigError, apply_overrides, load_config, to_dict
from acr.data import file_codecs
from acr.data.transforms import to_chw_normalized
from acr.models.factory import build_classifier
from acr.pseudo.job import check_stage_params, job_config
from acr.pseudo.train_irn import build_irn
from acr.refine import per_image
from acr.refine.crf import CRF_PRESETS
from acr.storage import RunFolder
from tests.conftest import TINY_OVERRIDES

JOB = {"pseudo.actors": 1, "pseudo.scales": [1.0], "pseudo.flip": False, "pseudo.irn_crop_size": 64,
       "pseudo.irn_epochs": 1, "pseudo.irn_batch_size": 8, "pseudo.exp_times": 4, "pseudo.overlays": 2,
       "pseudo.max_images": 5}


@pytest.fixture(scope="module")
def voc_checkpoint(voc_mini, tmp_path_factory):
    """A checkpoint of a VOC classifier (untrained: only its config and layout matter here)."""
    cfg = load_config(None, TINY_OVERRIDES + ["data.format=voc", f"data.root={voc_mini}"])
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint_000001"
    save_state(folder, {"config": to_dict(cfg), "classifier": build_classifier(cfg).state_dict()})
    return folder


def _job(checkpoint, **extra):
    return job_config(apply_overrides(Config(), {"pseudo.checkpoint": str(checkpoint)}), {**JOB, **extra})


def test_checkpoint_is_found_from_a_run_or_tune_folder_and_bad_ones_are_named(voc_checkpoint, tmp_path):
    assert Path(resolve_checkpoint(voc_checkpoint / "state.pt")) == voc_checkpoint.resolve()
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(voc_checkpoint)}))
    tune = tmp_path / "tune"
    tune.mkdir()
    (tune / "summary.json").write_text(json.dumps({"best_checkpoint": str(run)}))
    assert Path(resolve_checkpoint(tune)) == voc_checkpoint.resolve()
    with pytest.raises(ConfigError, match="nowhere"):
        resolve_checkpoint(tmp_path / "nowhere")
    cfg = _job(tune, **{"pseudo.irn_epochs": 2})
    assert cfg.data.format == "voc" and cfg.pseudo.irn_epochs == 2  # the checkpoint's config plus the overrides
    with pytest.raises(ConfigError, match="pseudo.crf='bogus'"):
        _job(voc_checkpoint, **{"pseudo.crf": "bogus"})
    with pytest.raises(ConfigError, match="pseudo.conf_bg_threshold"):
        _job(voc_checkpoint, **{"pseudo.conf_bg_threshold": 0.5, "pseudo.conf_fg_threshold": 0.3})
    with pytest.raises(ConfigError, match=r"pseudo.sem_seg_bg_threshold must be in \[0, 1\] or null .* got 1.5"):
        _job(voc_checkpoint, **{"pseudo.sem_seg_bg_threshold": 1.5})
    assert _job(voc_checkpoint, **{"pseudo.sem_seg_bg_threshold": None}).pseudo.sem_seg_bg_threshold is None


def test_files_made_with_other_settings_are_not_reused(tmp_path):
    made = "crf/ and ir_labels/"
    check_stage_params(RunFolder(tmp_path), {"seed_threshold": 0.3, "crf": "psa"}, "refine", made)
    check_stage_params(RunFolder(tmp_path), {"seed_threshold": 0.3, "crf": "psa"}, "refine", made)  # same settings: fine
    with pytest.raises(ConfigError, match="seed_threshold=0.3, not 0.9: use another --output-dir, or delete crf/"):
        check_stage_params(RunFolder(tmp_path), {"seed_threshold": 0.9, "crf": "psa"}, "refine", made)


def test_per_image_steps_on_hand_made_cams(tmp_path):

    cams = np.zeros((2, 8, 8), np.float32)
    cams[0, :4] = 0.9  # class 2 (index 1 of keys) on the top half ...
    cams[1, 4:, :4] = 0.5  # ... class 5 bottom-left, weaker
    keys = np.array([1, 4])
    seed = per_image.seed_labels(cams, keys, 0.4)
    assert (seed[:4] == 2).all() and (seed[4:, :4] == 5).all() and (seed[4:, 4:] == 0).all()
    assert (per_image.seed_labels(cams, keys, 0.6)[4:] == 0).all()  # the weaker class falls below the threshold
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4] = (200, 30, 30)
    image[4:, :4] = (30, 200, 30)
    crf = per_image.crf_labels(image, cams, keys, 0.4)
    assert set(np.unique(crf)) <= {0, 2, 5} and crf[1, 1] == 2 and crf[6, 1] == 5
    (tmp_path / "c.npz").write_bytes(file_codecs.cams_bytes(cams, keys))
    back, k = file_codecs.load_cams(tmp_path / "c.npz")
    assert np.allclose(back, cams, atol=1e-3) and k.tolist() == [1, 4]
    assert file_codecs.full_cams(back, k, 6)[[0, 2, 3, 5]].max() == 0 and file_codecs.full_cams(back, k, 6)[4, 6, 1] == 0.5
    (tmp_path / "m.png").write_bytes(file_codecs.label_png_bytes(crf))
    assert (file_codecs.read_label_png(tmp_path / "m.png") == crf).all()
    cfg = load_config(None, TINY_OVERRIDES)
    irn = build_irn(cfg)
    image_t = torch.zeros(3, 30, 22)
    mask = per_image.walk_labels(irn, image_t, np.zeros((2, 30, 22), np.float32) + 0.1, keys, 10.0, 2, 3, 1.0, 0.25)
    assert mask.shape == (30, 22) and set(np.unique(mask)) <= {2, 5}  # uniform CAMs: all foreground, no background


def test_the_mask_crf_snaps_the_walks_4_pixel_cells_to_the_image_edge():
    """pseudo.mask_crf: the walk resolves stride-4 cells, so an object edge inside a cell comes out blurred; the CRF
    on the walked scores puts it on the image's edge (column 9 here, inside the cell of columns 8-11)."""
    cfg = load_config(None, TINY_OVERRIDES)
    torch.manual_seed(0)
    irn = build_irn(cfg)
    raw = np.zeros((32, 24, 3), np.uint8)
    raw[:, :9] = (220, 40, 40)  # the object: columns 0-8
    cams = np.zeros((1, 32, 24), np.float32)
    cams[0, :, :9] = 1.0
    image = torch.from_numpy(to_chw_normalized(raw))
    args = (irn, image, cams, np.array([2]), 10.0, 2, 3, 1.0, 0.5)
    plain = per_image.walk_labels(*args)
    snapped = per_image.walk_labels(*args, crf=(raw, CRF_PRESETS["psa"]))
    truth = np.where(raw[..., 0] > 0, 3, 0)
    assert (snapped == truth).all()
    assert (plain != truth).sum() > 0  # without it, pixels of the straddled cell come out wrong
