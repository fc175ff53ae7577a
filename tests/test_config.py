import pytest
import yaml

from acr.cli import parse_job_args
from acr.config import Config, ConfigError, config_from_dict, load_config, to_dict
from tests.conftest import REPO


def test_presets_load():
    demo = load_config(REPO / "configs/demo.yaml")
    assert demo.data.format == "synthetic" and demo.model.backbone == "resnet18"
    assert demo.model.pretrained == "standin"  # the stand-in for ImageNet weights (tests/test_standin.py)
    off = load_config(REPO / "configs/voc_official.yaml", ["data.root=/data/VOC2012"])
    paper = load_config(REPO / "configs/voc_paper.yaml", ["data.root=/data/VOC2012"])
    assert off.optim.momentum_equals_weight_decay and not paper.optim.momentum_equals_weight_decay
    assert (off.method.decompose_at, paper.method.decompose_at) == ("image", "feature")
    assert (off.method.ru_nontarget_weight, paper.method.ru_nontarget_weight) == (0.3, 0.5)
    assert (off.train.epochs, off.optim.schedule_epochs) == (100, 40)


def test_overrides_are_typed_yaml():
    cfg = load_config(None, ["train.epochs=3", "eval.scales=[1.0, 2]", "model.pretrained=null", "optim.lr=1e-3",
                             "scaling.num_workers=2", "train.batch_size=4"])
    assert cfg.train.epochs == 3 and cfg.eval.scales == [1.0, 2.0] and cfg.model.pretrained is None
    assert cfg.optim.lr == 0.001 and isinstance(cfg.eval.scales[1], float)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("train.epochs=abc", "train.epochs: expected an integer, got 'abc'"),
    ("train.epochs=2.5", "train.epochs: expected an integer"),
    ("model.backbone=resnet7", "model.backbone: 'resnet7' is not one of"),
    ("model.freeze_bn=1", "model.freeze_bn: expected true or false"),
    ("train.batch_size=7", "must divide evenly among scaling.num_workers=2"),
    ("augment.crop_size=320", "multiple of 2\\*\\*model.decoder_depth=256"),
    ("method.srf.grid_size=7", "method.srf.grid_size=7 must divide augment.crop_size=256"),
    ("method.srf.q_start=1.5", "q_start must be in \\[0, 1\\]"),
    ("train.epochs", "not of the form key=value"),
])
def test_bad_values_name_the_key(override, message):
    extra = ["scaling.num_workers=2"] if "batch_size" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config(None, extra + [override])


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 2\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.warmup' \(from .*c.yaml\)"):
        load_config(f)


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.epochs=5"])
    assert config_from_dict(to_dict(cfg)) == cfg


def test_reference_yaml_lists_every_key_with_its_default():

    assert yaml.safe_load((REPO / "configs/reference.yaml").read_text()) == to_dict(Config())


def test_a_config_file_can_build_on_a_base_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 7\n  batch_size: 4\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size) == (2, 4)  # b's key wins, a's other keys stay
    shipped = load_config(REPO / "configs/tune_demo.yaml")
    assert shipped.synthetic.train_images == 160 and shipped.model.backbone == load_config(
        REPO / "configs/demo.yaml").model.backbone
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("trian:\n  epochs: 1\n")
    (tmp_path / "f.yaml").write_text("base: e.yaml\n")
    with pytest.raises(ConfigError, match="e.yaml.*trian|trian.*e.yaml"):
        load_config(tmp_path / "f.yaml")


def test_overrides_may_come_before_and_after_the_flags(tmp_path):

    cfg, out, _ = parse_job_args("d", None, ["train.epochs=2", "--output-dir", str(tmp_path), "train.batch_size=4"])
    assert (cfg.train.epochs, cfg.train.batch_size, out) == (2, 4, tmp_path)
