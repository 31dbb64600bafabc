"""Feature-level equivariant regularisation LER of MACL.

Reference:
    - MACL: Zeng et al., "Multi-level Asymmetric Contrastive Learning for Volumetric Medical
      Image Segmentation Pre-training", eq. 13: LER = || Y - down(Y~) ||_1.
    - SEAM: Wang et al., "Self-supervised Equivariant Attention Mechanism for Weakly
      Supervised Semantic Segmentation", CVPR 2020.

Y is the bottleneck of the down-sampled input (dominant branch), Y~ the bottleneck of the
full-resolution input (auxiliary branch); down() is average pooling by 1/lambda, which pairs
the cells that see the same image region (METHOD.md).

Both bottlenecks come from one encoder, so an L1 on raw features is lowered by shrinking the
last stage's norm weights instead of by making the branches agree. Each location's channel
vector is therefore L2-normalised first: LER compares directions, and scaling the features
leaves it unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .supcon import float32_math


def pair_cells(y_auxiliary: Tensor, size: tuple[int, ...]) -> Tensor:
    """down() of the full-resolution bottleneck: average pooling to ``size`` (the dominant grid), so
    that each pooled cell covers the image region of the dominant cell it is compared with."""
    return F.interpolate(y_auxiliary, size=tuple(int(s) for s in size), mode="area")


def equivariance_loss(y_dominant: Tensor, y_auxiliary: Tensor) -> Tensor:
    """LER (paper eq. 13) on scale-free features: L1, averaged over all elements, between the
    per-location L2-normalised channel vectors of Y and down(Y~).

    Args:
        y_dominant: (N, C, *s) bottleneck of the down-sampled input (Y), s 2-D or 3-D.
        y_auxiliary: (N, C, *S) bottleneck of the full-resolution input (Y~), S >= s on
            every axis; it is interpolated to s (no interpolation when S == s).

    Returns:
        Scalar float32 loss. Gradients reach both branches (no stop-gradient in the paper).
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

    with float32_math(y_dominant.device):
        y = y_dominant.float()
        y_tilde = y_auxiliary.float()
        if small != large:
            y_tilde = pair_cells(y_tilde, small)
        return F.l1_loss(F.normalize(y, dim=1), F.normalize(y_tilde, dim=1))


class EquivarianceLoss(nn.Module):
    """Module form of :func:`equivariance_loss`."""

    def forward(self, y_dominant: Tensor, y_auxiliary: Tensor) -> Tensor:
        return equivariance_loss(y_dominant, y_auxiliary)
