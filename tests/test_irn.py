"""IRN (Ahn, Cho & Kwak, CVPR 2019): path affinities, pair labels, boundary loss, sparse random walk, seeds, IRNet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from acr.models.backbones import build_backbone
from acr.models.irn import IRNet
from acr.refine.irn import (affinity_labels, boundary_loss, confident_labels, labels_from_walk, path_affinity,
                            path_offsets, propagate, random_walk, transition_matrix)



def test_path_offsets_are_irns_half_plane_directions():
    r5 = path_offsets(5)
    assert len(r5) == 34 and len(path_offsets(10)) == 152 and len(path_offsets(3)) == 12
    assert r5[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)] and r5[4] == (1, -4) and r5[-1] == (4, 2)
    assert len(set(r5)) == len(r5) and (0, 0) not in r5
    for dy, dx in path_offsets(10):
        assert (dy > 0 or (dy == 0 and dx > 0)) and dy * dy + dx * dx < 100
        assert (-dy, -dx) not in path_offsets(10)  # one half plane: each unordered pair once


def _wall_edge() -> torch.Tensor:
    edge = torch.zeros(1, 5, 6)
    edge[0, :, 3] = 1.0  # a vertical wall of boundary at x = 3
    edge[0, 2, 1] = 0.3
    edge[0, 1, 0] = 0.2
    return edge


def test_path_affinity_is_one_minus_the_max_boundary_on_the_path():
    offsets = [(0, 1), (0, 2), (1, 2), (2, -1)]
    edge = _wall_edge().requires_grad_(True)
    a = path_affinity(edge, offsets)
    assert a.shape == (1, 4, 5, 6)
    d = {o: a[0, i] for i, o in enumerate(offsets)}
    # (0, 2): path (y, x), (y, x+1), (y, x+2)
    assert d[(0, 2)][2, 0].item() == pytest.approx(0.7) and d[(0, 2)][1, 0].item() == pytest.approx(0.8)
    assert d[(0, 2)][0, 0].item() == 1.0 and d[(0, 2)][0, 4].item() == 0.0  # (0, 6) is outside
    assert d[(0, 2)][:, 1:4].abs().max().item() == 0.0  # these paths cross or start on the wall
    # (1, 2): IRN's thick path covers the whole 2x3 box (every pixel is within distance 1 of the line)
    assert d[(1, 2)][1, 0].item() == pytest.approx(0.7) and d[(1, 2)][1, 1].item() == 0.0
    assert d[(1, 2)][3, 0].item() == 1.0
    assert d[(1, 2)][0, 4].item() == 0.0 and d[(1, 2)][4, 0].item() == 0.0  # destinations outside
    # (2, -1): the 3x2 box (y..y+2, x-1..x), all within distance 1 of the line
    assert d[(2, -1)][0, 2].item() == pytest.approx(0.7) and d[(2, -1)][0, 5].item() == 1.0
    assert d[(2, -1)][0, 4].item() == 0.0 and d[(2, -1)][0, 0].item() == 0.0 and d[(2, -1)][3, 2].item() == 0.0
    # every pair on opposite sides of the wall has affinity 0; every in-image pair of the right side has 1
    for i, (dy, dx) in enumerate(offsets):
        for y in range(5):
            for x in range(6):
                y2, x2 = y + dy, x + dx
                if 0 <= y2 < 5 and 0 <= x2 < 6 and min(x, x2) <= 3 <= max(x, x2):
                    assert a[0, i, y, x].item() == 0.0
                if 0 <= y2 < 5 and 0 <= x2 < 6 and min(x, x2) > 3:
                    assert a[0, i, y, x].item() == 1.0
    a.sum().backward()
    assert edge.grad is not None and edge.grad[0, 2, 1].item() < 0 and edge.grad[0, 1, 0].item() < 0


def test_affinity_labels_counts_and_positions():
    label = torch.tensor([[[0, 0, 1, 1],
                           [0, 255, 1, 2],
                           [0, 0, 2, 2]]])
    bg, fg, neg = affinity_labels(label, [(0, 1), (1, 0), (1, -1)])
    assert bg.shape == (1, 3, 3, 4) and bg.dtype == torch.float32
    # horizontal pairs: bg (0,0)-(0,1), (2,0)-(2,1); fg (0,2)-(0,3), (2,2)-(2,3); neg (0,1)-(0,2), (1,2)-(1,3),
    # (2,1)-(2,2); the two pairs touching the 255 pixel and the last column (destination outside) count nowhere
    assert (bg[0, 0].sum().item(), fg[0, 0].sum().item(), neg[0, 0].sum().item()) == (2, 2, 3)
    assert bg[0, 0, 0, 0] == 1 and neg[0, 0, 0, 1] == 1 and fg[0, 0, 0, 2] == 1 and neg[0, 0, 1, 2] == 1
    assert (bg + fg + neg)[0, 0, :, 3].sum() == 0 and (bg + fg + neg)[0, 0, 1, :2].sum() == 0
    # vertical pairs: bg column 0 (x2); fg (0,2)-(1,2), (1,3)-(2,3); neg (1,2)-(2,2), (0,3)-(1,3)
    assert (bg[0, 1].sum().item(), fg[0, 1].sum().item(), neg[0, 1].sum().item()) == (2, 2, 2)
    # (1, -1): (0,1)-(1,0) bg, (0,2)-(1,1) ignored, (0,3)-(1,2) fg, (1,1)-(2,0) ignored, (1,2)-(2,1) neg, (1,3)-(2,2) fg
    assert (bg[0, 2].sum().item(), fg[0, 2].sum().item(), neg[0, 2].sum().item()) == (1, 2, 1)
    assert (bg + fg + neg).max() == 1  # the three sets are disjoint


def test_boundary_loss_matches_the_hand_computed_value():
    a = torch.tensor([[[[0.9, 0.2], [0.5, 0.7]]]])
    bg = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    fg = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    neg = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    eps = 1e-5
    l_bg = -math.log(0.9 + eps) / (1 + eps)
    l_fg = (-math.log(0.5 + eps) - math.log(0.7 + eps)) / (2 + eps)
    l_neg = -math.log(1 + eps - 0.2) / (1 + eps)
    loss = boundary_loss(a, bg, fg, neg)
    assert loss.item() == pytest.approx((l_bg / 2 + l_fg / 2 + l_neg) / 2, rel=1e-6)
    # (0.10536 / 2 + 0.52491 / 2 + 0.22314) / 2 = 0.26914 without eps; the eps terms lower it by 1.6e-5
    assert loss.item() == pytest.approx(0.269124, abs=2e-6)


def _dense_transition(aff: torch.Tensor, offsets, beta: float) -> torch.Tensor:
    """IRN's dense construction, pixel by pixel."""
    _, h, w = aff.shape
    a = torch.eye(h * w, dtype=torch.float64)
    for k, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    p, q = y * w + x, (y + dy) * w + x + dx
                    a[p, q] = a[q, p] = aff[k, y, x].item()
    a = a ** beta
    return a / a.sum(0, keepdim=True)


def test_transition_matrix_is_irns_column_normalised_power():
    torch.manual_seed(0)
    offsets = path_offsets(3)
    aff = path_affinity(torch.rand(1, 4, 4), offsets)[0]
    t = transition_matrix(aff, offsets, beta=3.0)
    assert t.layout in (torch.sparse_csr, torch.sparse_coo) and t.shape == (16, 16)
    n_pairs = sum((4 - abs(dy)) * (4 - abs(dx)) for dy, dx in offsets)
    assert t._nnz() == 16 + 2 * n_pairs <= 16 * (2 * len(offsets) + 1)
    dense = t.to_dense().double()
    assert torch.allclose(dense.sum(0), torch.ones(16, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(dense, _dense_transition(aff, offsets, 3.0), atol=1e-6)


def test_random_walk_equals_the_dense_product():
    torch.manual_seed(1)
    offsets = path_offsets(3)
    aff = path_affinity(torch.rand(1, 5, 6) ** 2, offsets)[0]
    t = transition_matrix(aff, offsets, beta=2.0)
    x = torch.rand(3, 5, 6)
    dense = _dense_transition(aff, offsets, 2.0)
    expected = x.reshape(3, 30).double() @ torch.linalg.matrix_power(dense, 4)
    assert torch.allclose(random_walk(x, t, 4).reshape(3, 30).double(), expected, atol=1e-5)
    assert torch.allclose(random_walk(x, t.to_sparse_coo(), 4).reshape(3, 30).double(), expected, atol=1e-5)


def test_random_walk_stays_in_its_region_on_a_strip():
    aff = torch.ones(1, 1, 8)
    aff[0, 0, 3] = 0.0  # the pair (3, 4) is cut
    t = transition_matrix(aff, [(0, 1)], beta=1.0)
    x = torch.zeros(1, 1, 8)
    x[0, 0, 0] = 1.0
    rw = random_walk(x, t, 64)[0, 0]
    assert rw[3].item() > 0.1 and rw[4:].abs().max().item() < 1e-3
    assert rw[:4].sum().item() == pytest.approx(0.8, abs=0.01)  # 4 x (degree-weighted average: 2 / 10)


def test_propagate_spreads_cams_within_the_boundary():
    edge = torch.zeros(6, 6)
    edge[:, 3] = 0.9  # a strong (not perfect) boundary
    cams = torch.zeros(2, 6, 6)
    cams[0, 0, 0] = 1.0  # a seed in the left corner
    cams[1, 5, 5] = 1.0  # another on the right
    rw = propagate(cams, edge, beta=10.0, exp_times=6, radius=3)
    assert rw.shape == (2, 6, 6)
    assert rw[0, 5, 2].item() > 0.1 * rw[0].max().item() and rw[0, 5, 2].item() > 0.01  # far end of its region
    assert rw[0, :, 3:].abs().max().item() < 1e-3 and rw[1, :, :4].abs().max().item() < 1e-3


def test_labels_from_walk_normalises_by_the_global_max():
    rw = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 0.0, 0.0]],
                       [[0.0, 1.0, 0.0], [3.0, 4.0, 1.0]]])
    expected = np.array([[0, 5, 5], [12, 12, 0]], np.uint8)
    for keys in (np.array([0, 5, 12]), torch.tensor([0, 5, 12])):
        out = labels_from_walk(rw, keys, bg_threshold=0.3)
        assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.array_equal(labels_from_walk(torch.zeros(2, 2, 3), np.array([0, 5, 12]), 0.3), np.zeros((2, 3)))


def test_confident_labels_square_ring_and_background():
    img = np.full((32, 32, 3), 40, np.uint8)  # the regions have distinct colours, as objects do
    img[4:28, 4:28] = 110
    img[12:20, 12:20] = 200
    cams = np.zeros((3, 32, 32), np.float32)
    cams[0] = 1.0  # an absent class with a strong CAM is ignored
    cams[1] = 0.01
    cams[1, 4:28, 4:28] = 0.2  # weak ring
    cams[1, 12:20, 12:20] = 0.9  # strong square
    out = confident_labels(img, cams, np.array([0, 1, 0]), fg_threshold=0.3, bg_threshold=0.05)
    assert out.dtype == np.uint8 and out.shape == (32, 32) and set(np.unique(out)) <= {0, 2, 255}
    assert (out[13:19, 13:19] == 2).all()
    assert (out[5:27, 5:11] == 255).all() and (out[5:11, 5:27] == 255).all()
    assert (out[:3] == 0).all() and (out[:, -3:] == 0).all()
    assert (confident_labels(img, cams, np.zeros(3), 0.3, 0.05) == 0).all()  # no class: all background


def test_irnet_branch_trains_on_a_frozen_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 16, dropout=False)
    net = IRNet(backbone, width=16)
    net.train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and net.fuse.training
    mean_before = bns[0].running_mean.clone()
    image = torch.randn(2, 3, 64, 64)
    out = net(image)
    assert out.shape == (2, 16, 16) and out.min().item() > 0 and out.max().item() < 1
    assert torch.allclose(torch.sigmoid(net.logits(image)), out)
    out.mean().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in net.trainable_parameters())
    assert net.features == ("stem", "stage3", "stage4", "stage5", "final")  # IRN's five taps, x1 (the stem) first
    assert net.fuse.in_channels == 5 * 16 and net.branches[0][0].in_channels == 64
    assert all(b[0].weight.grad.abs().sum().item() > 0 for b in net.branches) and net.fuse.weight.grad.abs().sum() > 0
    assert torch.equal(bns[0].running_mean, mean_before)
    trainable = {id(p) for p in net.trainable_parameters()}
    assert trainable.isdisjoint(id(p) for p in backbone.parameters())
    assert trainable == {id(p) for p in net.parameters() if p.requires_grad}


def test_a_one_pixel_diagonal_boundary_is_not_stepped_over():
    edge = torch.zeros(1, 4, 4)
    for i in range(4):
        edge[0, i, 3 - i] = 1.0  # the anti-diagonal
    a = path_affinity(edge, [(1, 1)])
    # (1,1) -> (2,2) crosses the wall between its pixels; a thin path {(1,1), (2,2)} would see no boundary
    assert a[0, 0, 1, 1].item() == 0.0
    assert a[0, 0, 0, 1].item() == 0.0 and a[0, 0, 1, 0].item() == 0.0  # (0,1)->(1,2), (1,0)->(2,1): cross it
    assert a[0, 0, 0, 0].item() == 1.0  # (0,0)->(1,1): path box {(0,0),(0,1),(1,0),(1,1)} has no boundary
