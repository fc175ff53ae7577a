"""The ViT variant: DeiT against timm, MCTformer-v2's maps on hand-computed tensors, weights from a timm-format file,
gradient routing of both ACR phases with a ViT classifier, and bad input named."""

import pytest
import timm
import torch

from acr.config import load_config
from acr.errors import ConfigError, WeightsError
from acr.method.acr import Batch, classification_loss, cu_phase, ru_phase, sample_target
from acr.models.factory import build_classifier, build_reconstructor
from acr.models.mctformer import (MCTformerV2, class_attention_maps, class_token_scores, fuse_maps, head_mean,
                                  patch_affinity, refine_with_affinity)
from acr.models.vit import VIT_SIZES, VisionTransformer
from tests.conftest import TINY_OVERRIDES

VIT_OVERRIDES = TINY_OVERRIDES + ["model.backbone=deit_tiny", "model.vit.encoder_backbone=resnet18",
                                  "data.format=synthetic", "synthetic.num_classes=3"]


def _timm_deit(name="deit_tiny_patch16_224"):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0).double().eval()


def test_the_vit_gives_timms_tokens_with_timms_weights():
    ref = _timm_deit()
    ours = VisionTransformer(VIT_SIZES["deit_tiny"], 224).double().eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()})
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    got = ours(x)
    want = ref.forward_features(x)
    assert torch.allclose(got["tokens"], want, atol=1e-10, rtol=0)
    assert len(got["attentions"]) == 12 and got["attentions"][0].shape == (2, 3, 197, 197)
    assert torch.allclose(got["attentions"][5].sum(-1), torch.ones(2, 3, 197, dtype=torch.float64))


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


@pytest.fixture()
def vit_setup():
    torch.manual_seed(0)
    cfg = load_config(None, VIT_OVERRIDES + ["model.vit.drop_path=0"])
    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    batch = Batch(torch.randn(2, 3, 64, 64), labels, sample_target(labels, torch.tensor([0.7, 0.1])),
                  torch.rand(2, 8, 8))
    return cfg, cls, rec, batch


def test_vit_ru_phase_trains_only_the_reconstructor(vit_setup):
    cfg, cls, rec, batch = vit_setup
    assert isinstance(cls, MCTformerV2) and type(rec.backbone).__name__ == "TorchvisionResNet"
    loss, _ = ru_phase(cls, rec, batch, cfg.method, q=0.5)
    loss.backward()
    assert all(p.grad is None for p in cls.parameters())
    assert rec.decoder.downs[0][0].weight.grad.abs().sum() > 0


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
def test_train_runs_the_vit_on_the_embedded_default_from_its_standins(ray_local, cache_dir, tmp_path):
    import json

    from acr.checkpoint import load_state
    from acr.train.driver import run_training

    cfg = load_config("configs/demo_vit.yaml", TINY_OVERRIDES + [
        f"data.cache_dir={cache_dir}", "synthetic.num_classes=3", "model.backbone=deit_tiny",
        "model.output_stride=16", "model.pretrained=standin", "model.vit.encoder_pretrained=standin",
        "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.log_every_steps=1"])
    run_training(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["cam_miou"] <= 1.0 and (tmp_path / "run" / "cam_overlays.png").stat().st_size > 0
    made = sorted(p.name.split("-")[0] for p in (cache_dir / "backbones").glob("*-standin-*.pth"))
    assert "deit_tiny" in made and "resnet18" in made  # the ViT's and its encoder's stand-ins
    state = load_state(summary["checkpoint"])
    assert state["classifier"]["backbone.cls_token"].shape == (1, 3, 192)  # one class token per class
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["steps"]) == 2
    epoch = history["epochs"][0]
    # L_cls is the sum of MCTformer's two losses: near 2 x log 2 after two steps, more than one BCE would be
    assert 1.0 < epoch["cu/loss_cls"] < 3.0
    assert epoch["cu/loss_t"] < 0 and epoch["cu/loss_nt"] < 0  # ACR's CU terms are in (the classifier maximises them)


def test_the_vit_demo_shares_the_resnet_demos_encoder_standin():
    from acr.train.standin import recipe_config, standin_path

    vit, demo = load_config("configs/demo_vit.yaml", []), load_config("configs/demo.yaml", [])
    assert standin_path(recipe_config(vit, backbone="resnet18")) == standin_path(recipe_config(demo))
    own = recipe_config(vit)
    assert standin_path(own).name.startswith("deit_tiny-standin-")
    assert own.optim.classifier_optimizer == "adamw" and own.method.reconstructor == "none"
