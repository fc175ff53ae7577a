"""The ViT variant: DeiT against timm, MCTformer-v2's maps on hand-computed tensors, weights from a timm-format file,
gradient routing of both ACR phases with a ViT classifier, and bad input named."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from acr.checkpoint import checkpoint_backbone, load_state
from acr.config import apply_overrides, config_from_dict, load_config, to_dict
from acr.errors import CheckpointError, ConfigError, WeightsError
from acr.method.acr import Batch, classification_loss, cu_phase, ru_phase, sample_target
from acr.models.factory import build_classifier, build_reconstructor
from acr.models.mctformer import (MCTformerV2, class_attention_maps, class_token_scores, fuse_maps, head_mean,
                                  patch_affinity, refine_with_affinity)
from acr.models.vit import VIT_SIZES, VisionTransformer, ViTFeatureMaps
from acr.pseudo.train_irn import load_trained_irn
from acr.train.standin import recipe_config, standin_path
from tests.conftest import REPO, TINY_OVERRIDES
from tests.test_pipeline import PIPELINE

VIT_OVERRIDES = TINY_OVERRIDES + ["model.backbone=deit_tiny", "model.vit.encoder_backbone=resnet18",
                                  "data.format=synthetic", "synthetic.num_classes=3"]


def _timm_deit(name="deit_tiny_patch16_224"):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0).double().eval()


def _timm_deit_and(cls):
    """timm's DeiT-Ti (fp64, eval) and our `cls` of the same size with its weights."""
    ref = _timm_deit()
    ours = cls(VIT_SIZES["deit_tiny"], 224).double().eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()})
    return ref, ours


def test_the_vit_gives_timms_tokens_with_timms_weights():
    ref, ours = _timm_deit_and(VisionTransformer)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    got = ours(x)
    want = ref.forward_features(x)
    assert torch.allclose(got["tokens"], want, atol=1e-10, rtol=0)
    assert len(got["attentions"]) == 12 and got["attentions"][0].shape == (2, 3, 197, 197)
    assert torch.allclose(got["attentions"][5].sum(-1), torch.ones(2, 3, 197, dtype=torch.float64))


def test_the_vit_block_maps_are_timms_intermediates_with_timms_weights():
    ref, ours = _timm_deit_and(ViTFeatureMaps)
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    got = ours(x)
    want = ref.forward_intermediates(x, indices=[3, 7, 11], output_fmt="NCHW", intermediates_only=True)
    for name, w in zip(("block4", "block8", "block12"), want):
        assert got[name].shape == (1, 192, 14, 14) and torch.allclose(got[name], w, atol=1e-10, rtol=0), name
    final = ref.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 192, 14, 14)
    assert torch.allclose(got["final"], final, atol=1e-10, rtol=0)


def test_head_mean_and_class_attention_maps_by_hand():
    # 2 blocks, 1 image, 2 heads, tokens: 2 class tokens + 4 patches (a 2x2 grid)
    a = torch.zeros(1, 2, 6, 6)
    a[0, 0, 0, 2:] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # head 0, class 0 -> patches
    a[0, 1, 0, 2:] = torch.tensor([0.3, 0.2, 0.1, 0.0])  # head 1
    a[0, :, 1, 5] = 1.0  # class 1 attends to the last patch only, in both heads
    b = a.clone() * 2  # block 2 doubles everything
    attn = head_mean([a, b])
    assert attn.shape == (2, 1, 6, 6)
    last = class_attention_maps(attn, 2, 1, (2, 2))  # only the last block: 2 x head mean
    assert torch.allclose(last[0, 0], torch.tensor([[0.4, 0.4], [0.4, 0.4]]))
    both = class_attention_maps(attn, 2, 2, (2, 2))  # 1x + 2x
    assert torch.allclose(both[0, 0], torch.tensor([[0.6, 0.6], [0.6, 0.6]]))
    assert torch.allclose(both[0, 1], torch.tensor([[0.0, 0.0], [0.0, 3.0]]))


def test_patch_affinity_refinement_and_fusion_by_hand():
    attn = torch.zeros(2, 1, 5, 5)  # 2 blocks, 1 class token, 4 patches
    attn[0, 0, 1:, 1:] = torch.eye(4)
    attn[1, 0, 1, 1:] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # patch 0 also attends to patch 1
    aff = patch_affinity(attn, 1)
    assert torch.equal(aff[0], torch.eye(4) + torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    refined = refine_with_affinity(maps, aff)
    assert torch.equal(refined, torch.tensor([[[[3.0, 2.0], [3.0, 4.0]]]]))  # patch 0 += patch 1
    patchcam = torch.tensor([[[[-1.0, 2.0], [0.5, -3.0]]]])
    assert torch.equal(fuse_maps(maps, patchcam), torch.tensor([[[[0.0, 4.0], [1.5, 0.0]]]]))
    assert torch.equal(class_token_scores(torch.tensor([[[1.0, 3.0], [-2.0, 0.0]]])), torch.tensor([[2.0, -1.0]]))


def test_classification_loss_sums_the_two_mctformer_losses():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.3]]])
    labels = torch.tensor([[1.0, 0.0]])
    want = classification_loss(logits[..., 0], labels) + classification_loss(logits[..., 1], labels)
    assert torch.allclose(classification_loss(logits, labels), want)
    assert want > classification_loss(logits[..., 0], labels)


def test_mctformer_maps_and_localisation_map():
    torch.manual_seed(0)
    net = MCTformerV2("deit_tiny", 3, 64, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    cam, logits = net(x)
    m = net.maps(x)
    assert cam.shape == (2, 3, 4, 4) and logits.shape == (2, 3, 2)
    assert torch.equal(cam, m["patchcam"])
    assert torch.allclose(logits[..., 1], m["patchcam"].mean(dim=(2, 3)))
    refined = net.localisation_map(x)
    want = refine_with_affinity(fuse_maps(m["class_attention"], m["patchcam"]), m["affinity"])
    assert torch.equal(m["affinity"], patch_affinity(head_mean(net.backbone(x)["attentions"]), 3))
    assert set(net.maps(x, ("patchcam",), affinity=False)) == {"patchcam", "scores"}  # training: no attention maps
    assert torch.allclose(refined, want)
    assert (refined >= 0).all()  # attention x ReLU(PatchCAM), spread by non-negative affinities
    # another size: the position embedding is resized; a side that is no multiple of 16 is resized to one
    assert net.localisation_map(torch.randn(1, 3, 96, 80)).shape == (1, 3, 6, 5)
    assert net.localisation_map(torch.randn(1, 3, 100, 70)).shape == (1, 3, 6, 4)


def test_a_timm_deit_file_loads_with_tokens_per_class_and_a_resized_grid(tmp_path):
    ref = _timm_deit().float()
    path = tmp_path / "deit_tiny_patch16_224.pth"
    torch.save({"model": ref.state_dict()}, path)  # DeiT's release layout
    net = MCTformerV2("deit_tiny", 3, 64, pretrained=str(path))
    vit = net.backbone
    assert torch.equal(vit.blocks[7].mlp.fc1.weight, ref.blocks[7].mlp.fc1.weight)
    assert vit.cls_token.shape == (1, 3, 192)
    assert all(torch.equal(vit.cls_token[0, c], ref.cls_token[0, 0]) for c in range(3))
    assert vit.pos_embed.shape == (1, 3 + 16, 192)
    assert torch.equal(vit.pos_embed[0, 2], ref.pos_embed[0, 0])  # each class token's embedding is DeiT's one
    # a DeiT-S file does not fit DeiT-Ti: the tensor is named
    small = tmp_path / "deit_small.pth"
    torch.save(_timm_deit("deit_small_patch16_224").state_dict(), small)
    with pytest.raises(WeightsError, match="deit_small.pth.*(cls_token|patch_embed).*384"):
        MCTformerV2("deit_tiny", 3, 64, pretrained=str(small))


def test_bad_sizes_are_named():
    net = MCTformerV2("deit_tiny", 3, 64)
    with pytest.raises(ValueError, match="72x64 is not a multiple of the ViT's patch size 16"):
        net(torch.randn(1, 3, 72, 64))
    with pytest.raises(ConfigError, match="augment.crop_size=72 must be a multiple of deit_tiny's patch size 16"):
        load_config(None, VIT_OVERRIDES + ["augment.crop_size=72"])
    with pytest.raises(ConfigError, match="output stride 16 only"):
        load_config(None, VIT_OVERRIDES + ["model.output_stride=8"])


@pytest.fixture(params=["cnn", "vit_blocks"])
def vit_setup(request):
    torch.manual_seed(0)
    encoder = [f"model.vit.encoder={request.param}"] + (
        ["model.encoder_taps=[block4,block8,final]"] if request.param == "vit_blocks" else [])
    cfg = load_config(None, VIT_OVERRIDES + ["model.vit.drop_path=0"] + encoder)
    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    batch = Batch(torch.randn(2, 3, 64, 64), labels, sample_target(labels, torch.tensor([0.7, 0.1])),
                  torch.rand(2, 8, 8))
    return cfg, cls, rec, batch


def test_vit_ru_phase_trains_only_the_reconstructor(vit_setup):
    cfg, cls, rec, batch = vit_setup
    assert isinstance(cls, MCTformerV2) and type(rec.backbone).__name__ == {
        "cnn": "TorchvisionResNet", "vit_blocks": "ViTFeatureMaps"}[cfg.model.vit.encoder]
    loss, _ = ru_phase(cls, rec, batch, cfg.method, q=0.5)
    loss.backward()
    assert all(p.grad is None for p in cls.parameters())
    assert rec.decoder.downs[0][0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rec.backbone.parameters())  # G_E trains too


def test_vit_cu_phase_trains_only_the_classifier_and_reaches_it_through_the_map(vit_setup):
    cfg, cls, rec, batch = vit_setup
    loss, stats = cu_phase(cls, rec, batch, cfg.method)
    loss.backward()
    assert all(p.grad is None for p in rec.parameters())
    assert cls.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert stats["cu/loss"] != stats["cu/loss_cls"]  # the reconstruction terms are in
    # they reach F through A_t (the PatchCAM head): its gradient differs from the baseline's (L_cls alone)
    with_terms = cls.cam_head.weight.grad.clone()
    cls.zero_grad(set_to_none=True)
    cls.eval()  # no stochastic depth, so that both passes compute the same map
    loss, _ = cu_phase(cls, None, batch, cfg.method)
    loss.backward()
    assert not torch.allclose(with_terms, cls.cam_head.weight.grad)


@pytest.mark.slow
def test_the_pipeline_runs_on_the_vit_from_its_standins(cache_dir, tmp_path):
    """ray_jobs/pipeline.py with the ViT preset: train.py's run (1 epoch, summary.json, overlays), pseudo-labels
    with IRN on the reconstructor's encoder, DeepLab started from that encoder."""


    out = tmp_path / "pipe"
    args = [sys.executable, "ray_jobs/pipeline.py", "--config", "configs/demo_vit.yaml", "--output-dir", str(out),
            *TINY_OVERRIDES, *PIPELINE, f"data.cache_dir={cache_dir}", "synthetic.num_classes=3",
            "model.backbone=deit_tiny", "model.output_stride=16", "model.pretrained=standin",
            "model.vit.encoder_pretrained=standin", "train.log_every_steps=1", "pipeline.upper_bound=false",
            "segment.epochs=1", "segment.max_val_images=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads((out / "1_cams" / "summary.json").read_text())
    assert 0.0 <= summary["cam_miou"] <= 1.0 and (out / "1_cams" / "cam_overlays.png").stat().st_size > 0
    made = sorted(p.name.split("-")[0] for p in (cache_dir / "backbones").glob("*-standin-*.pth"))
    assert "deit_tiny" in made and "resnet18" in made  # the ViT's and its encoder's stand-ins
    state = load_state(summary["checkpoint"])
    assert state["classifier"]["backbone.cls_token"].shape == (1, 3, 192)  # one class token per class
    history = json.loads((out / "1_cams" / "history.json").read_text())
    assert len(history["steps"]) == 2
    epoch = history["epochs"][0]
    # L_cls is the sum of MCTformer's two losses: near 2 x log 2 after two steps, more than one BCE would be
    assert 1.0 < epoch["cu/loss_cls"] < 3.0
    assert epoch["cu/loss_t"] < 0 and epoch["cu/loss_nt"] < 0  # ACR's CU terms are in (the classifier maximises them)
    pseudo = json.loads((out / "2_pseudo_labels" / "summary.json").read_text())
    assert pseudo["stages"]["irn"]["backbone"] == "encoder" and 0.0 <= pseudo["mask_miou"] <= 1.0
    assert len(list((out / "2_pseudo_labels" / "masks").glob("*.png"))) == 8
    irn = load_trained_irn(config_from_dict(pseudo["config"]), out / "2_pseudo_labels")
    assert torch.equal(irn.backbone.state_dict()["conv1.weight"], state["reconstructor"]["backbone.conv1.weight"])
    seg = json.loads((out / "3_deeplab" / "summary.json").read_text())
    assert seg["backbone_init"].startswith("the trained CNN of") and 0.0 <= seg["val_miou"] <= 1.0
    report = json.loads((out / "report.json").read_text())
    assert report["val_miou_pseudo"] == seg["val_miou"]


def test_the_vit_demo_shares_the_resnet_demos_encoder_standin():

    vit, demo = load_config("configs/demo_vit.yaml", []), load_config("configs/demo.yaml", [])
    assert standin_path(recipe_config(vit, backbone="resnet18")) == standin_path(recipe_config(demo))
    own = recipe_config(vit)
    assert standin_path(own).name.startswith("deit_tiny-standin-")
    assert own.optim.classifier_optimizer == "adamw" and own.method.reconstructor == "none"


def test_the_vit_map_choices_share_one_standin_and_what_shapes_its_weights_does_not():

    def path(*overrides):
        return standin_path(recipe_config(load_config("configs/demo_vit.yaml", list(overrides))))

    # no map enters the classification-only pre-training: the benchmark's rows that differ only in them share one file
    assert path("model.vit.train_cam=class_attention", "model.vit.cam=patchcam", "model.vit.attention_layers=2",
                "model.vit.affinity_refine=false") == path()
    assert path("model.vit.drop_path=0.0") != path() and path("model.backbone=deit_small") != path()


def test_irn_and_deeplab_take_a_cnn_of_the_checkpoint_named_by_the_choice(tmp_path):

    torch.manual_seed(0)
    cfg = load_config(None, VIT_OVERRIDES)
    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    state = {"config": to_dict(cfg), "classifier": cls.state_dict(), "reconstructor": rec.state_dict()}
    src = checkpoint_backbone(state, "ckpt")  # auto, a ViT with a reconstructor: its encoder
    assert (src.name, src.output_stride) == ("resnet18", 8) and "reconstructor's encoder" in src.description
    assert torch.equal(src.build().conv1.weight, rec.backbone.conv1.weight)
    with pytest.raises(ConfigError, match="ckpt: the classifier is a ViT \\(deit_tiny\\)"):
        checkpoint_backbone(state, "ckpt", "classifier")
    baseline = {**state, "reconstructor": None}
    with pytest.raises(CheckpointError, match="ckpt holds no reconstructor"):
        checkpoint_backbone(baseline, "ckpt", "encoder")
    with pytest.raises(ConfigError, match="ckpt was trained from no weights file"):
        checkpoint_backbone(baseline, "ckpt")  # auto without a reconstructor: the ImageNet CNN, which it lacks
    weights = tmp_path / "resnet18.pth"
    torch.save(rec.backbone.state_dict(), weights)
    with_file = {**baseline, "config": to_dict(apply_overrides(cfg, {"model.vit.encoder_pretrained": str(weights)}))}
    src = checkpoint_backbone(with_file, "ckpt")
    assert src.weights_file == str(weights) and torch.equal(src.build().conv1.weight, rec.backbone.conv1.weight)
    cnn = load_config(None, TINY_OVERRIDES)
    cnn_state = {"config": to_dict(cnn), "classifier": build_classifier(cnn).state_dict(), "reconstructor": None}
    src = checkpoint_backbone(cnn_state, "ckpt")  # auto, a CNN classifier: its backbone
    assert src.name == "resnet18" and torch.equal(src.state["conv1.weight"], cnn_state["classifier"][
        "backbone.conv1.weight"])


def test_a_vit_blocks_encoder_starts_from_the_deit_file_and_is_no_cnn_for_irn(tmp_path):

    deit = _timm_deit().float()
    weights = tmp_path / "deit_tiny.pth"
    torch.save(deit.state_dict(), weights)
    cfg = load_config(None, VIT_OVERRIDES + ["model.vit.encoder=vit_blocks", "model.encoder_taps=[block4,final]",
                                             "model.encoder_tap_channels=[8,16]", f"model.pretrained={weights}"])
    rec = build_reconstructor(cfg)
    assert rec.backbone.num_tokens == 1 and torch.equal(rec.backbone.blocks[3].attn.qkv.weight,
                                                        deit.blocks[3].attn.qkv.weight)
    _, x = rec.encode(torch.randn(1, 3, 64, 64))
    assert x.shape == (1, 24, 4, 4)  # the two taps at the patch grid
    state = {"config": to_dict(cfg), "classifier": {}, "reconstructor": rec.state_dict()}
    with pytest.raises(ConfigError, match="ckpt: the reconstructor's encoder is a ViT's blocks"):
        checkpoint_backbone(state, "ckpt", "encoder")
    with pytest.raises(ConfigError, match="model.encoder_taps \\['stage4'\\] are not ViT taps"):
        load_config(None, VIT_OVERRIDES + ["model.vit.encoder=vit_blocks", "model.encoder_taps=[stage4]",
                                           "model.encoder_tap_channels=[8]"], job="train")


@pytest.mark.slow
def test_tune_searches_acr_on_the_vit(cache_dir, tmp_path):
    """ray_jobs/tune.py with the ViT preset: two trials of ACR on MCTformer-v2, and best.yaml keeps the ViT."""


    out, space = tmp_path / "tune", tmp_path / "space.yaml"
    space.write_text("method.srf.grid_size: {categorical: [4, 8]}\nmethod.cu_target_weight: {uniform: [0.2, 1.2]}\n")
    args = [sys.executable, "ray_jobs/tune.py", "--config", "configs/demo_vit.yaml", "--output-dir", str(out),
            "--space", str(space), *VIT_OVERRIDES, f"data.cache_dir={cache_dir}", "model.vit.encoder_pretrained=null",
            "train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=4", "train.log_every_steps=0",
            "tune.num_samples=2", "tune.select_max_images=4", "eval.max_images=4", "scaling.cpus_per_worker=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 2 and summary["n_errored"] == 0 and 0.0 <= summary["best_cam_miou"] <= 1.0
    best = load_config(out / "best.yaml")
    assert best.model.backbone == "deit_tiny"
    assert best.method.srf.grid_size == summary["best_config"]["method.srf.grid_size"]
    state = load_state(summary["best_checkpoint"])
    assert state["classifier"]["backbone.cls_token"].shape == (1, 3, 192)  # MCTformer-v2: a class token per class
    assert "backbone.conv1.weight" in state["reconstructor"]  # ACR's reconstructor, on its ResNet-18 encoder
