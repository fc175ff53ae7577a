"""Gradient isolation: each phase's gradients reach only the network it trains."""

import dataclasses

import pytest
import torch

from acr.config import load_config
from acr.method import acr as A
from acr.method.acr import Batch, cu_phase, ru_phase, sample_target
from acr.method.optim import build_optimizer
from acr.method.step import StepCounters, autocast_context, memory_layout, train_step, uses_bf16
from acr.models.factory import build_classifier, build_reconstructor
from tests.conftest import TINY_OVERRIDES


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    cfg = load_config(None, TINY_OVERRIDES + ["data.format=synthetic", "synthetic.num_classes=4"])
    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    batch = Batch(torch.randn(2, 3, 64, 64), labels, sample_target(labels, torch.tensor([0.7, 0.1])),
                  torch.rand(2, 8, 8))
    return cfg, cls, rec, batch


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _identical(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_ru_step_changes_only_the_reconstructor(setup):
    cfg, cls, rec, batch = setup
    opt_rec = build_optimizer(rec, cfg.optim)
    before_cls, before_rec = _snapshot(cls), _snapshot(rec)
    loss, _ = ru_phase(cls, rec, batch, cfg.method, q=0.5)
    loss.backward()
    assert all(p.grad is None for p in cls.parameters())
    assert rec.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0  # encoder trained
    assert rec.decoder.downs[0][0].weight.grad.abs().sum() > 0  # decoder trained
    opt_rec.step()
    assert _identical(before_cls, _snapshot(cls))
    assert not _identical(before_rec, _snapshot(rec))


def test_cu_step_changes_only_the_classifier(setup):
    cfg, cls, rec, batch = setup
    opt_cls = build_optimizer(cls, cfg.optim)
    before_cls, before_rec = _snapshot(cls), _snapshot(rec)
    loss, stats = cu_phase(cls, rec, batch, cfg.method)
    loss.backward()
    assert all(p.grad is None for p in rec.parameters())  # the reconstructor has no gradients at all
    assert stats["cu/loss_t"] < 0 and stats["cu/loss_nt"] <= 0
    opt_cls.step()
    assert _identical(before_rec, _snapshot(rec))
    assert not _identical(before_cls, _snapshot(cls))


def test_cu_reconstruction_terms_reach_the_classifier_through_the_cam(setup):
    cfg, cls, rec, batch = setup
    cfg.method.cu_nontarget_mask = "cam"
    cfg.method.cu_target_mask = "soft"
    loss, stats = cu_phase(cls, rec, batch, cfg.method)
    (loss - stats["cu/loss_cls"]).backward()  # only the adversarial terms
    assert cls.cam_head[-1].weight.grad.abs().sum() > 0


def test_autoencode_term_trains_the_decoder_only(setup):
    cfg, cls, rec, batch = setup
    cfg.method.ru_target_weight = cfg.method.ru_nontarget_weight = cfg.method.encoder_cls_weight = 0.0
    loss, _ = ru_phase(cls, rec, batch, cfg.method, q=0.5)
    loss.backward()
    assert rec.decoder.downs[0][0].weight.grad.abs().sum() > 0
    enc = [p.grad for n, p in rec.named_parameters() if n.startswith(("backbone.", "taps.")) and p.requires_grad]
    assert all(g is None or g.abs().sum() == 0 for g in enc)


def test_full_iteration_then_phase_order_and_nan_guard(setup):
    cfg, cls, rec, batch = setup
    opt_cls, opt_rec = build_optimizer(cls, cfg.optim), build_optimizer(rec, cfg.optim)
    counters = StepCounters()
    raw = {"image": batch.image, "labels": batch.labels, "target_u": torch.tensor([0.7, 0.1]), "grid_u": batch.grid_u}
    out = train_step(cls, rec, opt_cls, opt_rec, raw, cfg, 0.5, 100, counters, lambda t: t, torch.device("cpu"))
    assert counters.cls_steps == 1 and counters.rec_steps == 1 and out["ru/loss"] > 0
    before = _snapshot(cls)
    bad = dict(raw, image=torch.full_like(batch.image, float("nan")))
    out = train_step(cls, rec, opt_cls, opt_rec, bad, cfg, 0.5, 100, counters, lambda t: t, torch.device("cpu"))
    assert counters.skipped_steps == 2 and counters.cls_steps == 1  # both phases skipped, counts not advanced
    assert _identical(before, _snapshot(cls))


def _explicit_ru_loss(cls, rec, b, cfg, q):
    """RU written directly from the equations (Eq. 3, 8-10, 5-7), materialising X_t, X_nt, X_t^RU, X_nt^RU."""

    size = b.image.shape[-2:]
    with torch.no_grad():
        cam, _ = cls(b.image)
        a = torch.nn.functional.interpolate(A.target_cam(A.normalize_cam(cam), b.labels, b.target), size=size,
                                            mode="bilinear", align_corners=False)
    g = A.remnant_grid(b.grid_u, q, size)
    logits_e, x = rec.encode(b.image)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x_t, x_nt = A.decompose(x, a)
    x_t_ru, x_nt_ru = A.feed_remnants(x_t, x_nt, g)
    r_t, r_nt = rec.decode(torch.cat([x_t_ru, x_nt_ru]), size).chunk(2)
    r_ae = rec.decode(x.detach(), size)
    v_t, v_nt = A.ru_validation_masks(a, g)
    w = (((1 - a) + g * a).flatten(1).sum(1) > cfg.min_valid_pixels).float()
    loss = A.ru_loss(A.masked_l1(r_t, b.image, v_t, "tensor_size"), A.masked_l1(r_nt, b.image, v_nt, "tensor_size", w),
                     cfg.ru_target_weight, cfg.ru_nontarget_weight)
    return loss + cfg.autoencode_weight * A.masked_l1(r_ae, b.image, torch.ones_like(a), "tensor_size") \
        + cfg.encoder_cls_weight * A.classification_loss(logits_e, b.labels)


def test_fused_ru_equals_the_explicit_equations(setup):
    """The phase applies Eq. 3/8-9 as masks on X in one product (a speed-up); loss and gradients must not change."""
    cfg, cls, rec, batch = setup
    fused, _ = ru_phase(cls, rec, batch, cfg.method, q=0.5)
    fused.backward()
    g_fused = [p.grad.clone() for p in rec.parameters() if p.grad is not None]
    rec.zero_grad(set_to_none=True)
    explicit = _explicit_ru_loss(cls, rec, batch, cfg.method, 0.5)
    explicit.backward()
    g_explicit = [p.grad.clone() for p in rec.parameters() if p.grad is not None]
    assert fused.item() == pytest.approx(explicit.item(), rel=1e-6)
    assert len(g_fused) == len(g_explicit)
    for a, b in zip(g_fused, g_explicit):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_fused_cu_equals_the_explicit_equations(setup):

    cfg, cls, rec, batch = setup
    fused, _ = cu_phase(cls, rec, batch, cfg.method)
    fused.backward()
    g_fused = [p.grad.clone() for p in cls.parameters() if p.grad is not None]
    cls.zero_grad(set_to_none=True)
    size = batch.image.shape[-2:]
    cam, logits = cls(batch.image)
    with torch.no_grad():
        _, x = rec.encode(batch.image)
    up = lambda t: torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    a = up(A.target_cam(A.normalize_cam(cam), batch.labels, batch.target))
    x_t, x_nt = A.decompose(up(x), a)
    r_t, r_nt = rec.decode(torch.cat([x_t, x_nt]), size).chunk(2)
    v_t, v_nt = A.cu_validation_masks(a, up(cam), batch.target, "zero_cam", "cam_where_top")
    explicit = A.cu_loss(A.classification_loss(logits, batch.labels),
                         A.cu_target_loss(r_t, batch.image, v_t, "tensor_size"),
                         A.cu_nontarget_loss(r_nt, batch.image, v_nt, "tensor_size"), 0.8, 0.3)
    explicit.backward()
    g_explicit = [p.grad.clone() for p in cls.parameters() if p.grad is not None]
    assert fused.item() == pytest.approx(explicit.item(), rel=1e-6)
    for a_, b_ in zip(g_fused, g_explicit):
        assert torch.allclose(a_, b_, rtol=1e-4, atol=1e-7)


def test_adversarial_warmup_trains_the_classifier_with_l_cls_alone_first(setup):
    """method.adversarial_warmup_steps: RU runs from the first step, the CU reconstruction terms only after."""
    cfg, cls, rec, batch = setup
    cfg.method.adversarial_warmup_steps = 1
    opt_cls, opt_rec = build_optimizer(cls, cfg.optim), build_optimizer(rec, cfg.optim)
    counters = StepCounters()
    raw = {"image": batch.image, "labels": batch.labels, "target_u": torch.tensor([0.7, 0.1]), "grid_u": batch.grid_u}
    before_rec = _snapshot(rec)
    first = train_step(cls, rec, opt_cls, opt_rec, raw, cfg, 0.5, 100, counters, lambda t: t, torch.device("cpu"))
    assert not _identical(before_rec, _snapshot(rec))  # the reconstructor trained during the warm-up
    assert first["cu/loss"] == first["cu/loss_cls"] and "cu/loss_t" not in first
    second = train_step(cls, rec, opt_cls, opt_rec, raw, cfg, 0.5, 100, counters, lambda t: t, torch.device("cpu"))
    assert second["cu/loss_t"] < 0 and second["cu/loss"] < second["cu/loss_cls"]  # the adversarial terms are on


def _one_step(cfg, channels_last: bool, precision: str, dtype=torch.float32):
    """Losses and classifier parameters after one RU + CU iteration from a fixed init, batch and RNG."""

    cfg.train.channels_last, cfg.train.precision = channels_last, precision
    torch.manual_seed(0)
    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    for net in (cls, rec):
        net.to(dtype=dtype, memory_format=memory_layout(cfg))
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]], dtype=dtype)
    raw = {"image": torch.randn(2, 3, 64, 64, generator=g, dtype=dtype), "labels": labels,
           "target_u": torch.tensor([0.7, 0.1], dtype=dtype), "grid_u": torch.rand(2, 8, 8, generator=g, dtype=dtype)}
    torch.manual_seed(2)  # dropout
    out = train_step(cls, rec, build_optimizer(cls, cfg.optim), build_optimizer(rec, cfg.optim), raw, cfg, 0.5, 100,
                     StepCounters(), lambda t: t, torch.device("cpu"))
    return out, [p.detach().double().clone() for p in cls.parameters()]


def test_channels_last_computes_the_same_step(setup):
    """The NHWC layout (train.channels_last, a speed-up) changes only the summation order: same losses and updates
    (fp64, so that only the order of additions differs)."""
    cfg = setup[0]
    cfg.model.dropout = True
    nchw, p_nchw = _one_step(cfg, False, "fp64", torch.float64)
    nhwc, p_nhwc = _one_step(cfg, True, "fp64", torch.float64)
    for k in ("ru/loss", "cu/loss", "cu/loss_t", "cu/loss_nt"):
        assert nhwc[k] == pytest.approx(nchw[k], rel=1e-9, abs=1e-12), k
    assert max((a - b).abs().max().item() for a, b in zip(p_nchw, p_nhwc)) < 1e-9


def test_sharing_the_classifier_trunk_computes_the_same_step(setup):
    """train.share_classifier_trunk (a speed-up: the trunk runs once for RU and CU) gives the same losses and the
    same classifier update as two separate classifier passes, bit for bit in fp64, with ResNet-38's dropout in b6/b7
    (the tail that still runs twice)."""
    cfg = setup[0]
    cfg.model.dropout, cfg.model.backbone, cfg.model.output_stride = True, "resnet38d", 8
    steps = {}
    for share in (False, True):
        cfg.train.share_classifier_trunk = share
        steps[share] = _one_step(cfg, True, "fp64", torch.float64)
    (separate, p_separate), (shared, p_shared) = steps[False], steps[True]
    for k in ("ru/loss", "cu/loss", "cu/loss_cls", "cu/loss_t", "cu/loss_nt"):
        assert shared[k] == separate[k], k
    assert all(torch.equal(a, b) for a, b in zip(p_separate, p_shared))
    torch.manual_seed(0)
    init = [p.detach().double() for p in build_classifier(cfg).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(init, p_shared))  # the step did update the classifier


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")
def test_bf16_autocast_stays_close_to_fp32(setup):
    """train.precision=bf16: the losses of one iteration within 2% of fp32 (bf16 keeps 8 bits of mantissa)."""
    cfg = setup[0]
    fp32, _ = _one_step(cfg, True, "fp32")
    bf16, _ = _one_step(cfg, True, "bf16")
    for k in ("ru/loss", "cu/loss_cls", "cu/loss_t", "cu/loss_nt"):
        assert bf16[k] == pytest.approx(fp32[k], rel=0.02), (k, bf16[k], fp32[k])
    assert bf16["ru/loss"] != fp32["ru/loss"]  # bf16 really ran


def test_bf16_where_fast_means_bf16_exactly_where_the_device_has_bf16_kernels():
    """train.precision=bf16_where_fast (the demo configs): bf16 autocast on CUDA and on a CPU with oneDNN bf16
    kernels, fp32 on any other CPU; `auto` stays fp32 on the CPU, and only `bf16` forces it."""

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    has_kernels = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert uses_bf16(cpu, "bf16_where_fast") is has_kernels and uses_bf16(cuda, "bf16_where_fast")
    assert [uses_bf16(cpu, p) for p in ("auto", "fp32", "fp64", "bf16")] == [False, False, False, True]
    assert uses_bf16(cuda, "auto") and not uses_bf16(cuda, "fp32")
    with autocast_context(cpu, "bf16_where_fast"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == (torch.bfloat16 if has_kernels else torch.float32)


def test_adversarial_losses_take_a_map_at_any_resolution(setup):
    """The CU terms of a target map given at image resolution (as experiments/cu_objective.py scores ground-truth
    masks) with decomposition at the feature resolution: the decoder inputs use the map area-averaged to the feature
    cells, the validation masks use the map itself; checked against the equations written out. Gradients reach the
    map, not G; a zero weight drops its term."""

    cfg, cls, rec, batch = setup
    mcfg = dataclasses.replace(cfg.method, decompose_at="feature", cu_nontarget_mask="cam")
    rec.requires_grad_(False)
    with torch.no_grad():
        cam, _ = cls(batch.image)
        _, x = rec.encode(batch.image)
    (h, w), size = x.shape[-2:], batch.image.shape[-2:]
    fine = (torch.rand(2, 1, *size) > 0.5).float()
    fine[:, :, : size[0] // 2] = 0.0  # exact zeros: the released V_t^CU = 1[A == 0] is non-empty
    fine.requires_grad_(True)
    got = A.adversarial_losses(rec, x, batch.image, fine, cam, batch.target, mcfg)
    coarse = torch.nn.functional.avg_pool2d(fine, (size[0] // h, size[1] // w))  # mean over each feature cell
    r_t, r_nt = rec.decode(torch.cat([coarse * x, (1 - coarse) * x]), size).chunk(2)
    expected_t = -A.masked_l1(r_t, batch.image, (fine == 0).float(), "tensor_size")
    expected_nt = -A.masked_l1(r_nt, batch.image, fine.detach(), "tensor_size")
    assert got["t"].item() == pytest.approx(expected_t.item(), rel=1e-5)
    assert got["nt"].item() == pytest.approx(expected_nt.item(), rel=1e-5)
    (g,) = torch.autograd.grad(got["nt"], fine)
    assert g.abs().sum() > 0 and all(p.grad is None for p in rec.parameters())
    zero_weight = dataclasses.replace(mcfg, cu_target_weight=0.0)
    assert set(A.adversarial_losses(rec, x, batch.image, fine, cam, batch.target, zero_weight)) == {"nt"}
