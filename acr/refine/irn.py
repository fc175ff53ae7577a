"""IRN's class-boundary branch and random walk (Ahn, Cho & Kwak, "Weakly Supervised Learning of Instance Segmentation
with Inter-pixel Relations", CVPR 2019), as the released code (jiwoon-ahn/irn) runs them.

* :func:`confident_labels` (step/cam_to_ir_label.py): confident foreground/background seeds from CAMs;
* :func:`affinity_labels` (voc12/dataloader.py GetAffinityLabelFromIndices): pair labels from the seeds;
* :class:`acr.models.irn.IRNet` and :func:`path_affinity` / :func:`boundary_loss` (net/resnet50_irn.py, step/train_irn.py): the
  class boundary map B, affinities a_ij = 1 - max_{k on the path i->j} B(x_k) and their loss (IRN section 3.3);
* :func:`propagate` (misc/indexing.py propagate_to_edge) and :func:`labels_from_walk` (step/make_sem_seg_labels.py):
  the random walk on those affinities and the pseudo labels it gives.

Pixel pairs are indexed by an offset d = (dy, dx) of :func:`path_offsets` (IRN's PathIndex search directions, one
half plane): a (B, D, H, W) tensor holds at [b, d, y, x] the value for the pair ((y, x), (y + dy, x + dx)).
The dense N x N transition matrix that IRN squares 8 times is replaced by a sparse one applied 2^8 times (same
result, O(N D) memory instead of O(N^2)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from acr.refine.crf import LabelCRFParams, crf_from_labels

IGNORE = 255  # label of pixels that are neither confident foreground nor confident background

Offsets = Sequence[tuple[int, int]]


def path_offsets(radius: int) -> list[tuple[int, int]]:
    """IRN's PathIndex.get_all_dir_paths search directions: (0, dx) for dx in 1..radius-1, then (dy, dx) for dy in
    1..radius-1, |dx| < radius with dy^2 + dx^2 < radius^2 (one half plane: each unordered pair appears once)."""
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dy * dy + dx * dx < radius * radius]
    return offsets


def _path_points(dy: int, dx: int) -> list[tuple[int, int]]:
    """The pixels of the path from (0, 0) to (dy, dx) as IRN's PathIndex (misc/indexing.py get_search_paths_dst)
    takes them: every pixel of the bounding box whose distance to the line is below 1, both ends included. A thick
    path (4 pixels for (1, 1)), so that a one-pixel diagonal boundary cannot be stepped over."""
    length_sq = dy * dy + dx * dx
    return [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 / length_sq < 1]


def _overlap(n: int, d: int) -> slice:
    """The positions p in 0..n-1 with p + d also in 0..n-1, as a slice (empty when |d| >= n)."""
    lo = max(0, -d)
    return slice(lo, max(lo, min(n, n - d)))


def _shifted(t: Tensor, dy: int, dx: int, fill: float) -> Tensor:
    """out[..., y, x] = t[..., y + dy, x + dx], `fill` where (y + dy, x + dx) is outside the image."""
    h, w = t.shape[-2:]
    out = torch.full_like(t, fill)
    ys, xs = _overlap(h, dy), _overlap(w, dx)
    out[..., ys, xs] = t[..., ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
    return out


def path_affinity(edge: Tensor, offsets: Offsets) -> Tensor:
    """Affinities from a class boundary map (IRN section 3.3, a_ij = 1 - max_{k in path(i, j)} B(x_k); code:
    indexing.edge_to_affinity). `edge` (B, H, W) boundary probabilities in [0, 1]. Returns (B, D, H, W): at [b, d, y, x]
    1 - max of `edge` on the path from (y, x) to (y + dy, x + dx); 0 where the destination is outside the image (the
    map is padded with 1, as propagate_to_edge does). Differentiable w.r.t. `edge` (the gradient goes to the arg max,
    as max_pool2d routes it in IRN)."""
    if edge.dim() != 3:
        raise ValueError(f"path_affinity: edge must be (B, H, W), got {tuple(edge.shape)}")
    b, h, w = edge.shape
    if not offsets:
        return edge.new_zeros((b, 0, h, w))
    m = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(edge, (m, m, m, m), value=1.0)
    out = []
    for dy, dx in offsets:
        steps = [padded[:, m + sy:m + sy + h, m + sx:m + sx + w] for sy, sx in _path_points(dy, dx)]
        out.append(1.0 - torch.stack(steps).max(0).values)
    return torch.stack(out, 1)


def affinity_labels(label: Tensor, offsets: Offsets) -> tuple[Tensor, Tensor, Tensor]:
    """IRN's GetAffinityLabelFromIndices (IRN section 3.2, P+_bg, P+_fg, P-): `label` (B, H, W) int64, 0 background,
    1..C classes, 255 ignore. Returns float (B, D, H, W) masks (bg_pos, fg_pos, neg) of the pairs (p, p + d) with both
    pixels inside the image and neither ignored: bg_pos both background, fg_pos the same class, neg different labels."""
    if label.dim() != 3:
        raise ValueError(f"affinity_labels: label must be (B, H, W), got {tuple(label.shape)}")
    if not offsets:
        empty = label.new_zeros((label.shape[0], 0, *label.shape[1:]), dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    bg, fg, neg = [], [], []
    src_ok = label != IGNORE
    for dy, dx in offsets:
        dst = _shifted(label, dy, dx, IGNORE)
        valid = src_ok & (dst != IGNORE)
        same = label == dst
        bg.append(valid & same & (label == 0))
        fg.append(valid & same & (label > 0))
        neg.append(valid & ~same)
    return tuple(torch.stack(m, 1).float() for m in (bg, fg, neg))


def boundary_loss(affinity: Tensor, bg_pos: Tensor, fg_pos: Tensor, neg: Tensor, eps: float = 1e-5,
                  denominator: Callable[[Tensor, float], Tensor] | None = None) -> Tensor:
    """The class boundary loss, IRN section 3.3 (Eq. (7)-(8)), as step/train_irn.py computes it: pos = -log(a + eps),
    neg = -log(1 + eps - a); L_bg, L_fg, L_neg the means of pos over bg_pos, pos over fg_pos, neg over neg (sum / (count
    + eps)); loss = (L_bg / 2 + L_fg / 2 + L_neg) / 2. `denominator(count, eps)` (default count + eps) lets a worker
    of several divide by the global batch's count instead (acr.runtime.collectives.batch_denominator)."""
    share = denominator or (lambda count, e: count + e)
    pos_term = -torch.log(affinity + eps)
    neg_term = -torch.log(1.0 + eps - affinity)
    l_bg = (bg_pos * pos_term).sum() / share(bg_pos.sum(), eps)
    l_fg = (fg_pos * pos_term).sum() / share(fg_pos.sum(), eps)
    l_neg = (neg * neg_term).sum() / share(neg.sum(), eps)
    return (l_bg / 2 + l_fg / 2 + l_neg) / 2


def transition_matrix(affinity: Tensor, offsets: Offsets, beta: float) -> Tensor:
    """IRN's affinity_sparse2dense + to_transition_matrix without the dense matrix: A (N x N, N = H W, row-major pixel
    order) has A[i, i] = 1 and A[p, p + d] = A[p + d, p] = affinity[d, p] for the pairs inside the image;
    T = A^beta / sum_i A^beta[i, :] (elementwise power, columns sum to 1). `affinity` (D, H, W) for one image.
    Returns T as a sparse CSR tensor with at most N (2 D + 1) entries, on affinity's device. Not differentiable
    (inference only, as in IRN); negative affinities are clamped to 0."""
    if affinity.dim() != 3 or affinity.shape[0] != len(offsets):
        raise ValueError(f"transition_matrix: affinity must be (D={len(offsets)}, H, W), got {tuple(affinity.shape)}")
    _, h, w = affinity.shape
    n = h * w
    a = affinity.detach().clamp(min=0.0)
    index = torch.arange(n, device=a.device).view(h, w)
    rows, cols, values = [index.view(-1)], [index.view(-1)], [a.new_ones(n)]
    for k, (dy, dx) in enumerate(offsets):
        ys, xs = _overlap(h, dy), _overlap(w, dx)
        src = index[ys, xs].reshape(-1)
        dst = src + (dy * w + dx)
        v = a[k, ys, xs].reshape(-1)
        rows += [src, dst]
        cols += [dst, src]
        values += [v, v]
    rows, cols = torch.cat(rows), torch.cat(cols)
    values = torch.cat(values).pow(beta)
    column_sum = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, cols, values)
    values = values / column_sum[cols]  # >= 1 (the diagonal), never 0
    t = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=False)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return t.coalesce().to_sparse_csr()


def random_walk(x: Tensor, transition: Tensor, steps: int) -> Tensor:
    """x (K, H, W) seen as (K, N) multiplied on the right by T `steps` times: x T^steps (IRN's propagate_to_edge
    computes T^(2^exp_times) by squaring a dense N x N matrix; repeated sparse products give the same with O(N D)
    memory). `transition` sparse (COO, CSR or CSC) or dense (N, N). Returns (K, H, W)."""
    k, h, w = x.shape
    n = h * w
    if tuple(transition.shape) != (n, n):
        raise ValueError(f"random_walk: transition is {tuple(transition.shape)}, x has {n} pixels")
    tt = transition.t()  # x T = (T^T x^T)^T: sparse @ dense with the sparse matrix on the left is the fast product
    if tt.layout == torch.sparse_coo:
        tt = tt.coalesce()
    if tt.layout not in (torch.sparse_csr, torch.strided):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tt = tt.to_sparse_csr()
    y = x.reshape(k, n).t().to(tt.dtype).contiguous()
    for _ in range(steps):
        y = tt @ y
    return y.t().reshape(k, h, w).to(x.dtype)


@torch.no_grad()
def propagate(cams: Tensor, edge: Tensor, beta: float = 10.0, exp_times: int = 8, radius: int = 5) -> Tensor:
    """IRN's indexing.propagate_to_edge: `cams` (K, h, w) at the boundary map's resolution (stride 4), `edge` (h, w).
    Affinities from the boundary map (radius `radius`), T = transition_matrix(..., beta), the CAMs damped on boundaries
    (cams * (1 - edge)) walked 2^exp_times steps. Returns (K, h, w)."""
    if cams.dim() != 3 or cams.shape[-2:] != edge.shape:
        raise ValueError(f"propagate: cams {tuple(cams.shape)} and edge {tuple(edge.shape)} must be (K, h, w), (h, w)")
    offsets = path_offsets(radius)
    affinity = path_affinity(edge[None], offsets)[0]
    transition = transition_matrix(affinity, offsets, beta)
    return random_walk(cams * (1.0 - edge), transition, 2 ** exp_times)


def scaled_to_max(rw: Tensor) -> Tensor:
    """Walked CAMs divided by their global max (IRN's make_sem_seg_labels), left as they are when it is not positive."""
    rw = rw.detach()
    top = rw.max()
    return rw / top if top > 0 else rw


def labels_from_walk(rw: Tensor, keys: Tensor | np.ndarray, bg_threshold: float) -> np.ndarray:
    """The last step of IRN's make_sem_seg_labels: `rw` (K, H, W) walked CAMs at image size, divided by their global
    max (left as is when the max is not positive), a constant background score `bg_threshold` stacked in front, argmax,
    mapped through `keys` (K + 1 ints: keys[0] = 0 background, then class index + 1). Returns the uint8 (H, W) map."""
    keys = np.asarray(keys.detach().cpu() if isinstance(keys, Tensor) else keys, np.int64)
    if rw.dim() != 3 or keys.shape != (rw.shape[0] + 1,):
        raise ValueError(f"labels_from_walk: rw {tuple(rw.shape)} needs {rw.shape[0] + 1} keys, got {keys.shape}")
    if rw.shape[0] == 0:
        return np.full(tuple(rw.shape[1:]), keys[0], np.uint8)
    rw = scaled_to_max(rw)
    scores = torch.cat([torch.full_like(rw[:1], bg_threshold), rw])
    return keys[scores.argmax(0).cpu().numpy()].astype(np.uint8)


def confident_labels(image: np.ndarray, cams: np.ndarray, labels: np.ndarray, fg_threshold: float,
                     bg_threshold: float, crf: LabelCRFParams = LabelCRFParams()) -> np.ndarray:
    """IRN's step/cam_to_ir_label: `cams` (C, H, W) in [0, 1] for all C classes, `labels` (C,) multi-hot (absent classes
    are ignored), `image` HxWx3 uint8. Foreground map: argmax over [fg_threshold, CAMs of the present classes] refined
    by the label CRF; background map: the same with bg_threshold. Returns uint8 HxW: 0 confident background (both maps
    background), c + 1 confident class c (foreground map), 255 (:data:`IGNORE`) elsewhere."""
    c, h, w = cams.shape
    if image.shape[:2] != (h, w) or np.asarray(labels).shape != (c,):
        raise ValueError(f"confident_labels: image {image.shape}, cams {cams.shape}, labels {np.shape(labels)}")
    present = np.nonzero(np.asarray(labels) > 0.5)[0]
    keys = np.concatenate([[0], present + 1]).astype(np.int64)
    fg_cams = np.asarray(cams[present], np.float32)

    def thresholded(threshold: float) -> np.ndarray:
        scores = np.concatenate([np.full((1, h, w), threshold, np.float32), fg_cams])
        return keys[crf_from_labels(image, scores.argmax(0), len(keys), crf)]

    fg, bg = thresholded(fg_threshold), thresholded(bg_threshold)
    conf = fg.astype(np.uint8)
    conf[fg == 0] = IGNORE
    conf[(fg == 0) & (bg == 0)] = 0
    return conf
