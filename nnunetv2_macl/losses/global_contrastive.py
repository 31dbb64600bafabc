"""Image-level (global) contrastive loss Lg of MACL.

Reference:
    - MACL: Zeng et al., "Multi-level Asymmetric Contrastive Learning for Volumetric Medical
      Image Segmentation Pre-training", eq. 11.
    - PCL: Zeng et al., MICCAI 2021 (position-based positives); SimCLR: Chen et al., ICML 2020
      (positives="instance").

Lg = SupCon([Z_g; Z~_g], [p; p]): the dominant and auxiliary projections of N slices are
stacked into 2N vectors; the two views of one slice (delta = 0) are always positives.
"""

from __future__ import annotations

from torch import Tensor, nn

from .supcon import PositionSupConLoss


def global_contrastive_loss(
    z_dominant: Tensor,
    z_auxiliary: Tensor,
    positions: Tensor | None,
    threshold: float = 0.1,
    tau: float = 0.1,
    positives: str = "position",
    base_temperature: float | None = None,
) -> Tensor:
    """Lg (paper eq. 11).

    Args:
        z_dominant: (N, C) image-level projections of the dominant branch (Z_g).
        z_auxiliary: (N, C) image-level projections of the auxiliary branch (Z~_g).
        positions: (N,) or (N, D) normalised positions in [0, 1] (may be None for
            positives="instance").
        threshold: positives are pairs with |p_a - p_b| < threshold on every axis.
        tau: temperature.
        positives: "position" (PCL/MACL) or "instance" (SimCLR).
        base_temperature: optional tau / base_temperature factor.

    Returns:
        Scalar float32 loss.
    """
    loss_fn = PositionSupConLoss(
        threshold=threshold, tau=tau, positives=positives, base_temperature=base_temperature
    )
    return loss_fn(z_dominant, z_auxiliary, positions)


class GlobalContrastiveLoss(nn.Module):
    """Module form of :func:`global_contrastive_loss` (same arguments, stored at init)."""

    def __init__(
        self,
        threshold: float = 0.1,
        tau: float = 0.1,
        positives: str = "position",
        base_temperature: float | None = None,
    ) -> None:
        super().__init__()
        self.supcon = PositionSupConLoss(
            threshold=threshold, tau=tau, positives=positives, base_temperature=base_temperature
        )

    def forward(self, z_dominant: Tensor, z_auxiliary: Tensor, positions: Tensor | None) -> Tensor:
        return self.supcon(z_dominant, z_auxiliary, positions)
