"""Feature-level equivariant regularisation LER of MACL.

Reference:
    - MACL: Zeng et al., "Multi-level Asymmetric Contrastive Learning for Volumetric Medical
      Image Segmentation Pre-training", eq. 13: LER = || Y - down(Y~) ||_1.
    - SEAM: Wang et al., "Self-supervised Equivariant Attention Mechanism for Weakly
      Supervised Semantic Segmentation", CVPR 2020.

Y is the bottleneck of the down-sampled input (dominant branch), Y~ the bottleneck of the
full-resolution input (auxiliary branch). The dominant cell j sits on input pixel k*T*j, the
auxiliary cell k*j on the same pixel (METHOD.md, geometry), so down() here is the same centred
window as on the input: Y[j] is paired with the average of a window centred on Y~[k*j].

What the features are compared as, and why:
- centred: each channel minus its mean over the map's locations, per sample. Every nnU-Net stage
  ends with InstanceNorm + LeakyReLU, so all locations share a large common vector; without
  centring the per-location directions were nearly equal and LER read ~0.03-0.05 whatever the
  branches did. Centred, LER compares the spatial pattern of the two maps.
- per-location L2-normalised: both bottlenecks come from one encoder, and an L1 on raw features is
  lowered by shrinking the last stage's norm weights; directions cannot be shrunk.
- L1 summed over channels and divided by sqrt(C): a mean over channels of unit vectors is about
  1/sqrt(C) per channel (~1 % of the total loss at C = 256). Scaled this way, maps that agree give
  0 and unrelated maps about 2/sqrt(pi) = 1.13 for any channel count, the range of Lg's fall.
A map that is constant over its locations centres to zero: against a map with a spatial pattern
that costs ||b||_1 / sqrt(C) per location (about 0.8), not 0.

Zero padding (beyond the paper, which does not pad): where the slice is smaller than the crop, cells
of the bottleneck show padding, and the padding layout is nearly the same in every slice (centred
padding of slices of similar size). The centring and the L1 over those cells compare that layout, which
both branches can match without looking at the image: on Hippocampus (64 x 64 crop, 2 x 2 dominant
bottleneck) LER between the maps of *different* slices fell from 1.05 to 0.20 in one epoch. With a content
mask, exactly the cells that Ld leaves out (:func:`~nnunetv2_macl.losses.dense_contrastive.content_cells`:
area-averaged content below one half, on the dominant grid, the window centred on the cell's input pixel
k*T*j, which is also the pixel of the auxiliary cell k*j it is paired with) take no part: the channel
means are taken over the content cells only and the L1 is averaged over content cells only. A sample
with fewer than two content cells has no spatial pattern left once centred (one cell centres to zero)
and is left out; a batch without any such sample gives 0 (with a graph, zero gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunetv2_macl.data.augmentation import downsample

from .dense_contrastive import content_cells
from .supcon import float32_math


def pair_cells(y_auxiliary: Tensor, size: tuple[int, ...]) -> Tensor:
    """down() of the full-resolution bottleneck to the dominant grid ``size``: output cell j is the
    average of a window centred on auxiliary cell k*j, the cell on the same input pixel as the
    dominant cell j. Each axis of ``y_auxiliary`` must be k x that of ``size`` for an integer k."""
    large = tuple(int(s) for s in y_auxiliary.shape[2:])
    small = tuple(int(s) for s in size)
    if len(large) != len(small) or any(s < 1 or l % s for s, l in zip(small, large)):
        raise ValueError(f"the auxiliary bottleneck {large} must be an integer multiple of the dominant grid "
                         f"{small} on every axis (choose a crop divisible by stride x 1/lambda)")
    return downsample(y_auxiliary, [s / l for s, l in zip(small, large)])


def centred_directions(y: Tensor, cells: Tensor | None = None) -> Tensor:
    """(N, C, *S) -> per-location unit channel vectors of the map centred over its locations.

    With ``cells`` ((N, prod(S)) bool), each channel's mean is taken over the True cells only and the
    other cells are set to 0 (whatever they hold: ``torch.where``, so not even inf or nan leaks through,
    and their gradient is exactly 0)."""
    flat = y.flatten(2)
    if cells is None:
        centred = flat - flat.mean(dim=2, keepdim=True)
    else:
        keep = cells[:, None, :]
        count = cells.sum(dim=1).clamp(min=1).to(flat.dtype)[:, None, None]
        mean = torch.where(keep, flat, flat.new_zeros(())).sum(dim=2, keepdim=True) / count
        centred = torch.where(keep, flat - mean, flat.new_zeros(()))
    return F.normalize(centred, dim=1).reshape(y.shape)


def equivariance_cells(cells: Tensor, num_samples: int, grid: tuple[int, ...]) -> Tensor:
    """A per-cell mask of the dominant grid as LER uses it: (N, prod(grid)) bool, with the samples of
    fewer than two True cells (nothing left to compare once centred) all False. ``cells`` may be
    (N, *grid) or (N, prod(grid)), bool or 0/1 (non-zero counts as content)."""
    total = math.prod(int(g) for g in grid)
    if cells.shape[0] != num_samples or cells[0].numel() != total or cells.ndim not in (2, 1 + len(grid)) \
            or (cells.ndim > 2 and tuple(cells.shape[1:]) != tuple(grid)):
        raise ValueError(f"cells must have shape (N, *grid) or (N, prod(grid)) for N = {num_samples} and the "
                         f"dominant grid {tuple(grid)}, got {tuple(cells.shape)}")
    cells = cells.reshape(num_samples, total)
    cells = cells if cells.dtype == torch.bool else cells != 0
    return cells & (cells.sum(dim=1, keepdim=True) >= 2)


def equivariance_loss(y_dominant: Tensor, y_auxiliary: Tensor, content: Tensor | None = None,
                      cells: Tensor | None = None) -> Tensor:
    """LER (paper eq. 13) on centred, scale-free features (module docstring): the L1 distance of the
    per-location unit vectors of the centred maps Y and down(Y~), summed over channels and divided by
    sqrt(C), averaged over samples and locations (over content cells only, given a mask).

    Args:
        y_dominant: (N, C, *s) bottleneck of the down-sampled input (Y), s 2-D or 3-D.
        y_auxiliary: (N, C, *S) bottleneck of the full-resolution input (Y~), S = k x s per axis
            for integers k (S == s: compared as they are).
        content: optional (N, 1, *crop) content mask of the input crop (1 image, 0 padding), as given to
            Ld; the cells of the dominant grid s that Ld would leave out (area-averaged content below one
            half, :func:`~nnunetv2_macl.losses.dense_contrastive.content_cells`) are left out, together
            with the auxiliary windows paired with them.
        cells: instead of ``content``, the mask on the dominant grid itself: (N, *s) or (N, prod(s)),
            True (non-zero) on content cells.
        Without either, every location counts (the paper's loss, for crops without padding).

    Returns:
        Scalar float32 loss: 0 for maps with the same centred pattern, about 1.13 for unrelated
        ones. Gradients reach both branches (no stop-gradient in the paper). With a mask: samples with
        fewer than two content cells are left out, and with none left the loss is 0.
    """
    if y_dominant.ndim not in (4, 5) or y_auxiliary.ndim != y_dominant.ndim:
        raise ValueError(
            "bottlenecks must both be (N, C, *S) with 2-D or 3-D spatial S, got "
            f"y_dominant {tuple(y_dominant.shape)} and y_auxiliary {tuple(y_auxiliary.shape)}"
        )
    if y_dominant.shape[:2] != y_auxiliary.shape[:2]:
        raise ValueError(
            "bottlenecks must agree in batch and channels, got "
            f"y_dominant {tuple(y_dominant.shape)} and y_auxiliary {tuple(y_auxiliary.shape)}"
        )
    small, large = tuple(y_dominant.shape[2:]), tuple(y_auxiliary.shape[2:])
    if any(s > l for s, l in zip(small, large)):
        # down() only shrinks; a larger dominant bottleneck means the arguments are swapped.
        raise ValueError(
            "y_auxiliary (full-resolution bottleneck) must be at least as large as y_dominant on every "
            f"spatial axis, got y_dominant {tuple(y_dominant.shape)} and y_auxiliary {tuple(y_auxiliary.shape)}"
        )

    if content is not None and cells is not None:
        raise ValueError("give LER either content (the input's mask) or cells (the dominant grid's), not both")
    if content is not None:
        cells = content_cells(content, small)
    if cells is not None:
        cells = equivariance_cells(cells.to(y_dominant.device), y_dominant.shape[0], small)

    with float32_math(y_dominant.device):
        y = y_dominant.float()
        y_tilde = y_auxiliary.float()
        if small != large:
            y_tilde = pair_cells(y_tilde, small)
        channels = y.shape[1]
        if cells is None:
            distance = (centred_directions(y) - centred_directions(y_tilde)).abs().sum(dim=1)  # (N, *s)
            return distance.mean() / math.sqrt(channels)
        # both maps are 0 off the content cells, so there the distance is 0: sum, and divide by the cells
        distance = (centred_directions(y, cells) - centred_directions(y_tilde, cells)).abs().sum(dim=1)
        return distance.sum() / cells.sum().clamp(min=1) / math.sqrt(channels)


class EquivarianceLoss(nn.Module):
    """Module form of :func:`equivariance_loss`."""

    def forward(self, y_dominant: Tensor, y_auxiliary: Tensor, content: Tensor | None = None,
                cells: Tensor | None = None) -> Tensor:
        return equivariance_loss(y_dominant, y_auxiliary, content, cells)
