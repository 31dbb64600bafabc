"""Pixel-level (dense) contrastive loss Ld of MACL.

Reference:
    - MACL: Zeng et al., "Multi-level Asymmetric Contrastive Learning for Volumetric Medical
      Image Segmentation Pre-training", eq. 12 (restated in METHOD.md, lost in the text
      extraction) and Table VII (MSE / BYOL / SupCon forms of Ld).
    - BYOL: Grill et al., NeurIPS 2020 (normalised-MSE form).

form="supcon" (default, eq. 12): for every spatial location s,
SupCon([Z_l[:, :, s]; Z~_l[:, :, s]], [p; p]) with the slice positions as labels, averaged
over locations. All locations are computed at once as an (S, 2N, 2N) similarity tensor.

Cells of zero padding (a crop larger than the slice) carry no image content: with a content
mask, a cell whose content fraction is below one half is left out of every form of the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .supcon import (
    branch_positive_mask,
    check_positives,
    check_tau,
    check_threshold,
    float32_math,
    masked_supcon_loss,
)

DENSE_FORMS = ("supcon", "mse", "byol")


def _check_dense_inputs(z_dominant: Tensor, z_auxiliary: Tensor) -> None:
    if z_dominant.shape != z_auxiliary.shape or z_dominant.ndim not in (4, 5):
        raise ValueError(
            "dense features of both branches must have the same shape (N, C, *S) with 2-D or 3-D spatial S, got "
            f"z_dominant {tuple(z_dominant.shape)} and z_auxiliary {tuple(z_auxiliary.shape)}"
        )


def dense_contrastive_loss(
    z_dominant: Tensor,
    z_auxiliary: Tensor,
    positions: Tensor | None,
    threshold: float = 0.1,
    tau: float = 0.1,
    form: str = "supcon",
    positives: str = "position",
    base_temperature: float | None = None,
    content: Tensor | None = None,
) -> Tensor:
    """Ld (paper eq. 12) and its Table VII ablation forms.

    Args:
        z_dominant: (N, C, *S) pixel-level projection of the dominant branch (Z_l, the partial
            decoder output); S is 2-D or 3-D.
        z_auxiliary: (N, C, *S) pixel-level projection of the auxiliary branch (Z~_l).
        positions: (N,) or (N, D) normalised positions (only used by form="supcon" with
            positives="position").
        threshold: positives are pairs with |p_a - p_b| < threshold on every axis.
        tau: temperature (form="supcon").
        form: "supcon" (eq. 12), "mse" (plain MSE between the raw features, mean over samples,
            channels and locations; paper Table VII "MSE") or "byol" (Table VII "l2 normalized + MSE": (mean over samples and locations of
            2 - 2 cos(z_dom, z_aux); no negatives).
        positives: "position" (PCL/MACL) or "instance" (SimCLR), form="supcon" only.
        base_temperature: optional tau / base_temperature factor (form="supcon").
        content: optional (N, 1, *crop) mask of the input crop, 1 on image and 0 on padding (the
            same for both branches: their dense views are T_fix). Cells whose area-averaged content
            is below 0.5 are excluded.

    Returns:
        Scalar float32 loss.
    """
    if form not in DENSE_FORMS:
        raise ValueError(f"form must be one of {DENSE_FORMS}, got {form!r}")
    check_threshold(threshold)
    check_tau(tau, base_temperature)
    check_positives(positives)
    _check_dense_inputs(z_dominant, z_auxiliary)

    n, c = z_dominant.shape[:2]
    cells = content_cells(content, z_dominant.shape[2:]) if content is not None else None  # (N, S_total)
    if form == "supcon":
        mask = branch_positive_mask(positions, n, threshold, positives, z_dominant.device)
        # (2N, C, S_total) -> (S_total, 2N, C): one SupCon problem per location, batched.
        features = torch.cat([z_dominant.reshape(n, c, -1), z_auxiliary.reshape(n, c, -1)], dim=0)
        valid = None if cells is None else torch.cat([cells, cells], dim=0).T  # (S_total, 2N)
        return masked_supcon_loss(features.permute(2, 0, 1), mask, tau=tau, base_temperature=base_temperature,
                                  valid=valid)

    with float32_math(z_dominant.device):
        if form == "mse":
            per_cell = (z_dominant.float() - z_auxiliary.float()).pow(2).mean(dim=1)
        else:
            a = F.normalize(z_dominant.float(), dim=1)
            b = F.normalize(z_auxiliary.float(), dim=1)
            per_cell = 2.0 - 2.0 * (a * b).sum(dim=1)
        per_cell = per_cell.reshape(n, -1)
        if cells is None:
            return per_cell.mean()
        weights = cells.float()
        return (per_cell * weights).sum() / weights.sum().clamp(min=1.0)


def content_cells(content: Tensor, grid: tuple[int, ...] | torch.Size) -> Tensor:
    """(N, 1, *crop) content mask -> (N, prod(grid)) bool: cells of ``grid`` at least half image.

    The grid cells partition the crop into equal blocks (the crop is a multiple of the grid), so the
    content fraction of a cell is the block average of the mask.
    """
    if content.ndim != len(grid) + 2 or content.shape[1] != 1:
        raise ValueError(f"content must have shape (N, 1, *crop) with {len(grid)} spatial axes, got "
                         f"{tuple(content.shape)}")
    fraction = F.interpolate(content.float(), size=tuple(int(g) for g in grid), mode="area")
    return (fraction >= 0.5).reshape(content.shape[0], -1)


class DenseContrastiveLoss(nn.Module):
    """Module form of :func:`dense_contrastive_loss` (same arguments, stored at init)."""

    def __init__(
        self,
        threshold: float = 0.1,
        tau: float = 0.1,
        form: str = "supcon",
        positives: str = "position",
        base_temperature: float | None = None,
    ) -> None:
        super().__init__()
        if form not in DENSE_FORMS:
            raise ValueError(f"form must be one of {DENSE_FORMS}, got {form!r}")
        check_threshold(threshold)
        check_tau(tau, base_temperature)
        check_positives(positives)
        self.threshold = float(threshold)
        self.tau = float(tau)
        self.form = form
        self.positives = positives
        self.base_temperature = base_temperature

    def forward(self, z_dominant: Tensor, z_auxiliary: Tensor, positions: Tensor | None,
                content: Tensor | None = None) -> Tensor:
        return dense_contrastive_loss(
            z_dominant,
            z_auxiliary,
            positions,
            threshold=self.threshold,
            tau=self.tau,
            form=self.form,
            positives=self.positives,
            base_temperature=self.base_temperature,
            content=content,
        )

    def extra_repr(self) -> str:
        return (
            f"form={self.form!r}, threshold={self.threshold}, tau={self.tau}, "
            f"positives={self.positives!r}, base_temperature={self.base_temperature}"
        )
