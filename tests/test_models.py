import numpy as np
import pytest
import torch
import torchvision

from acr.checkpoint import export_backbone, save_state
from acr.errors import ConfigError
from acr.models.backbones import ResNet38d, build_backbone, calibrate_batchnorm
from acr.models.classifier import Classifier
from acr.models.reconstructor import Dropout, InstanceNorm, Reconstructor, UNetDecoder
from acr.models.weights import WeightsError, load_backbone_weights, read_mxnet_params, write_mxnet_params

_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}


def _mxnet_name(torch_name: str) -> str:
    """Independent inverse of psa's renaming: b3_1.bn_branch2a.weight -> arg:bn3b1_branch2a_gamma."""
    parts = torch_name.split(".")
    if parts[0] == "conv1a":
        return "arg:conv1a_weight"
    if parts[0] == "bn7":
        return ("aux:" if "running" in parts[1] else "arg:") + "bn7_" + _BN[parts[1]]
    stage, _, idx = parts[0][1:].partition("_")
    block = stage + ("a" if not idx else f"b{idx}")
    kind, branch = parts[1].split("_", 1)
    if kind == "conv":
        return f"arg:res{block}_{branch}_weight"
    return ("aux:" if "running" in parts[2] else "arg:") + f"bn{block}_{branch}_{_BN[parts[2]]}"


@pytest.mark.parametrize("legacy", [False, True])
def test_resnet38d_loads_mxnet_params_without_mxnet(tmp_path, legacy):
    torch.manual_seed(0)
    src = ResNet38d()
    for m in src.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    arrays = {_mxnet_name(k): v.numpy() for k, v in sd.items()}
    arrays["arg:linear1000_weight"] = np.zeros((1000, 4096), np.float32)  # ImageNet classifier, dropped
    path = tmp_path / "resnet_38d.params"
    write_mxnet_params(path, arrays, legacy=legacy)
    assert set(read_mxnet_params(path)) == set(arrays)
    dst = ResNet38d()
    load_backbone_weights(dst, path, "resnet38d")
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_torchvision_state_dict_and_mismatch_errors(tmp_path):
    tv = torchvision.models.resnet50(weights=None)
    p = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), p)
    net = Classifier("resnet50", 20, output_stride=8, pretrained=str(p))
    assert torch.equal(net.backbone.layer4[2].conv3.weight, tv.layer4[2].conv3.weight)
    with pytest.raises(WeightsError, match="resnet50.pth: tensor layer1.0.conv1.weight has shape .* resnet18 expects"):
        Classifier("resnet18", 20, pretrained=str(p))
    with pytest.raises(WeightsError, match="weights file not found"):
        Classifier("resnet18", 20, pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.params"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(WeightsError, match="not an MXNet .params file"):
        Classifier("resnet38d", 20, pretrained=str(bad))


def test_unknown_backbone_and_stride():
    with pytest.raises(ConfigError, match="unknown model.backbone 'vgg'"):
        build_backbone("vgg")
    with pytest.raises(ConfigError, match="output stride 8 only"):
        build_backbone("resnet38d", 16)


@pytest.mark.parametrize("name, stride", [("resnet18", 8), ("resnet18", 16), ("resnet50", 8), ("resnet38d", 8)])
def test_output_strides_and_cam_shapes(name, stride):
    net = Classifier(name, 5, output_stride=stride)
    cam, logits = net(torch.randn(1, 3, 64, 64))
    assert cam.shape == (1, 5, 64 // stride, 64 // stride) and logits.shape == (1, 5)
    assert torch.allclose(logits, cam.mean(dim=(2, 3)))


def test_unet_sizes_and_released_parameter_count():
    dec = UNetDecoder(448, 3, depth=8, width=64)
    assert sum(p.numel() for p in dec.parameters()) == pytest.approx(54.9e6, rel=2e-3)
    assert UNetDecoder(8, 3, depth=3, width=4)(torch.randn(1, 8, 24, 16)).shape == (1, 3, 24, 16)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        dec(torch.randn(1, 448, 320, 320))  # not a multiple of 2**8: the skip shapes do not match


def test_reconstructor_taps_and_decode_upsamples():
    rec = Reconstructor("resnet18", 4, output_stride=8, taps=("stage3", "stage4", "final"), tap_channels=(2, 3, 4),
                        decoder_depth=4, decoder_width=4, dropout=False)
    logits, x = rec.encode(torch.randn(2, 3, 64, 64))
    assert x.shape == (2, 9, 16, 16)  # finest tap (stride 4)
    assert rec.decode(x, (64, 64)).shape == (2, 3, 64, 64)


def test_frozen_bn_stays_frozen_and_calibration_sets_statistics():
    net = Classifier("resnet18", 3, output_stride=16)
    net.train()
    bn = net.backbone.bn1
    assert not bn.training and not bn.weight.requires_grad
    calibrate_batchnorm(net.backbone, [torch.randn(4, 3, 32, 32) * 2 + 1])
    assert not bn.training
    assert bn.running_mean.abs().sum() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bn.running_mean)  # frozen: training-mode forwards do not update statistics


def test_exported_backbone_initialises_both_networks(tmp_path):
    """A trained classifier's backbone, exported from a checkpoint, is a `model.pretrained` file: loading it gives
    the classifier's backbone tensors exactly (the embedded benchmark's stand-in for ImageNet weights)."""

    torch.manual_seed(0)
    trained = Classifier("resnet18", 6, output_stride=16, cam_head_hidden=32, dropout=False)
    for m in trained.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    save_state(tmp_path / "ckpt", {"classifier": trained.state_dict()})
    path = export_backbone(tmp_path / "ckpt", tmp_path / "backbone.pth")
    torch.manual_seed(1)
    fresh = Classifier("resnet18", 6, output_stride=16, cam_head_hidden=32, dropout=False, pretrained=str(path))
    want = trained.backbone.state_dict()
    got = fresh.backbone.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    save_state(tmp_path / "empty", {"classifier": {"head.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="no backbone tensors"):
        export_backbone(tmp_path / "empty", tmp_path / "x.pth")


def test_the_unet_norm_and_dropout_keep_nhwc_and_compute_what_the_nchw_modules_do():
    """The U-Net's InstanceNorm (a per-channel GroupNorm) and Dropout keep the channels_last layout (no conversions
    before the next convolution) and give nn.InstanceNorm2d's values and nn.Dropout's draws on the NCHW input."""
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64) * 3 + 1
    nhwc = x.contiguous(memory_format=torch.channels_last)
    out = InstanceNorm(6)(nhwc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, torch.nn.InstanceNorm2d(6)(x), rtol=0, atol=1e-13)
    assert float(out.mean((2, 3)).abs().max()) < 1e-12  # normalised per image and channel
    torch.manual_seed(3)
    want = torch.nn.Dropout(0.5)(x)
    torch.manual_seed(3)
    got = Dropout(0.5)(nhwc)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)
    assert (got == 0).any() and (got != 0).any()
    torch.manual_seed(3)
    assert not torch.equal(torch.nn.Dropout(0.5)(nhwc), want)  # what the stock module draws for an NHWC input
