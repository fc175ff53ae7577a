"""Each equation of the paper on small hand-computed tensors."""

import pytest
import torch

from acr.method import acr

T = torch.tensor


def test_sample_target_picks_among_present_classes_by_rank():
    labels = T([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    assert acr.sample_target(labels, T([0.0, 0.99, 0.0])).tolist() == [0, 1, 0]
    assert acr.sample_target(labels, T([0.6, 0.5, 0.99])).tolist() == [2, 1, 3]
    assert acr.sample_target(labels, T([0.49, 0.0, 0.5])).tolist() == [0, 1, 2]


def test_sample_target_rejects_unlabelled_image():
    with pytest.raises(ValueError, match="no class label"):
        acr.sample_target(T([[0.0, 0.0]]), T([0.3]))


def test_normalize_cam_is_relu_min_max_with_offset():
    z = T([[[[-1.0, 0.0], [1.0, 3.0]]]])
    a = acr.normalize_cam(z)
    eps = 1e-5
    expected = T([[[[0.0, 0.0], [(1 - eps) / (3 + eps), (3 - eps) / (3 + eps)]]]])
    assert torch.allclose(a, expected, atol=1e-7)
    assert a[0, 0, 0, 0] == 0.0  # exact zero at the minimum (matters for the hard V_t^CU)


def test_target_cam_zeroes_absent_classes_and_selects_t():
    cam = torch.arange(2 * 3 * 1 * 2, dtype=torch.float32).reshape(2, 3, 1, 2)
    labels = T([[1.0, 0, 1], [0, 1, 0]])
    a_t = acr.target_cam(cam, labels, T([2, 1]))
    assert a_t.tolist() == [[[[4.0, 5.0]]], [[[8.0, 9.0]]]]


def test_eq3_decompose():
    x = T([[[[2.0, 4.0]]]])
    a = T([[[[0.25, 1.0]]]])
    x_t, x_nt = acr.decompose(x, a)
    assert x_t.tolist() == [[[[0.5, 4.0]]]]
    assert x_nt.tolist() == [[[[1.5, 0.0]]]]
    assert torch.equal(x_t + x_nt, x)


def test_eq8_9_feed_remnants_with_fixed_grid():
    x_t, x_nt = T([[[[0.5, 4.0]]]]), T([[[[1.5, 0.0]]]])
    g = T([[[[1.0, 0.0]]]])
    x_t_ru, x_nt_ru = acr.feed_remnants(x_t, x_nt, g)
    assert x_t_ru.tolist() == [[[[2.0, 4.0]]]]  # X_t + g X_nt
    assert x_nt_ru.tolist() == [[[[2.0, 0.0]]]]  # X_nt + g X_t


def test_eq10_validation_masks_with_fixed_grid():
    a = T([[[[0.25, 1.0, 0.5]]]])
    g = T([[[[1.0, 0.0, 0.0]]]])
    v_t, v_nt = acr.ru_validation_masks(a, g)
    assert v_t.tolist() == [[[[0.0, 0.0, 0.5]]]]
    assert v_nt.tolist() == [[[[0.0, 1.0, 0.5]]]]
    # Without SRF: Eq. 5-6 masks 1 - A_t and A_t
    v_t0, v_nt0 = acr.ru_validation_masks(a, torch.zeros_like(g))
    assert v_t0.tolist() == [[[[0.75, 0.0, 0.5]]]] and v_nt0.tolist() == a.tolist()


def test_remnant_grid_thresholds_uniforms_and_upsamples_nearest():
    u = T([[[0.1, 0.9], [0.5, 0.2]]])
    g = acr.remnant_grid(u, 0.5, (4, 4))
    assert g.shape == (1, 1, 4, 4)
    assert g[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert acr.remnant_grid(u, 0.0, (2, 2)).sum() == 0 and acr.remnant_grid(u, 1.0, (2, 2)).sum() == 4


def test_masked_l1_normalisations():
    image = torch.zeros(1, 3, 1, 2)
    recon = torch.zeros(1, 3, 1, 2)
    recon[0, :, 0, 0] = 2.0
    recon[0, :, 0, 1] = 4.0
    mask = T([[[[0.5, 0.0]]]])
    # sum |V (I - Î)| = 3 channels * 0.5 * 2 = 3
    assert acr.masked_l1(recon, image, mask, "tensor_size").item() == pytest.approx(3 / 6)
    assert acr.masked_l1(recon, image, mask, "mask_area").item() == pytest.approx(3 / (3 * 0.5))
    # batch of two: per-image values averaged; weights zero an image but keep the batch denominator
    r2, i2, m2 = recon.repeat(2, 1, 1, 1), image.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1)
    assert acr.masked_l1(r2, i2, m2, "tensor_size", weights=T([1.0, 0.0])).item() == pytest.approx(0.25)


def test_eq5_to_7_ru_loss_from_terms():
    image = torch.zeros(1, 3, 1, 2)
    recon_t = torch.ones(1, 3, 1, 2)
    recon_nt = 2 * torch.ones(1, 3, 1, 2)
    a = T([[[[0.25, 1.0]]]])
    v_t, v_nt = acr.ru_validation_masks(a, torch.zeros_like(a))
    l_t = acr.masked_l1(recon_t, image, v_t, "tensor_size")  # Eq. 5: (0.75 + 0) * 3 / 6
    l_nt = acr.masked_l1(recon_nt, image, v_nt, "tensor_size")  # Eq. 6: 2 * (0.25 + 1) * 3 / 6
    assert l_t.item() == pytest.approx(0.375) and l_nt.item() == pytest.approx(1.25)
    assert acr.ru_loss(l_t, l_nt, 0.5, 0.3).item() == pytest.approx(0.5 * 0.375 + 0.3 * 1.25)


def test_cu_validation_masks_soft_and_hard():
    a = T([[[[0.0, 0.4, 1.0]]]])
    cam = T([[[[0.0, 5.0, 1.0]], [[1.0, 2.0, 3.0]]]])  # 2 classes; argmax = [1, 0, 1]
    target = T([0])
    v_t, v_nt = acr.cu_validation_masks(a, cam, target, "soft", "cam")
    assert torch.allclose(v_t, T([[[[1.0, 0.6, 0.0]]]])) and v_nt.tolist() == a.tolist()
    v_t, v_nt = acr.cu_validation_masks(a, cam, target, "zero_cam", "cam_where_top")
    assert v_t.tolist() == [[[[1.0, 0.0, 0.0]]]]
    assert torch.allclose(v_nt, T([[[[0.0, 0.4, 0.0]]]]))


def test_eq12_14_cu_loss_signs_and_weights():
    image = torch.zeros(1, 3, 1, 1)
    recon = torch.full((1, 3, 1, 1), 2.0)
    v = torch.ones(1, 1, 1, 1)
    l_t = acr.cu_target_loss(recon, image, v, "tensor_size")  # Eq. 12: -|V (I - Î)|_1 = -2
    l_nt = acr.cu_nontarget_loss(recon, image, 0.5 * v, "tensor_size")  # Eq. 13: -1
    assert l_t.item() == pytest.approx(-2.0) and l_nt.item() == pytest.approx(-1.0)
    assert acr.cu_loss(T(0.7), l_t, l_nt, 0.8, 0.3).item() == pytest.approx(0.7 - 1.6 - 0.3)  # Eq. 14


def test_classification_loss_is_bce_with_logits_mean():
    logits, labels = T([[0.0, 2.0]]), T([[1.0, 0.0]])
    expected = (torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(2.0)))) / 2
    assert acr.classification_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_reconstruction_target_unit_range_inverts_imagenet_normalisation():
    img = torch.zeros(1, 3, 1, 1)  # normalised 0 = the ImageNet mean colour
    assert acr.reconstruction_target(img, "unit_range").flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert acr.reconstruction_target(img, "normalized") is img
