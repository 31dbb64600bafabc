"""Pixel-level (dense) contrastive loss Ld of MACL.

Reference:
    - MACL: Zeng et al., "Multi-level Asymmetric Contrastive Learning for Volumetric Medical
      Image Segmentation Pre-training", eq. 12 (restated in METHOD.md, lost in the text
      extraction) and Table VII (MSE / BYOL / SupCon forms of Ld).
    - BYOL: Grill et al., NeurIPS 2020 (normalised-MSE form).

form="supcon" (default, eq. 12): for every spatial location s,
SupCon([Z_l[:, :, s]; Z~_l[:, :, s]], [p; p]) with the slice positions as labels, averaged
over locations. All locations are computed at once as an (S, 2N, 2N) similarity tensor.

contrast="locations" (beyond the paper, METHOD.md "What the three losses do not reward"): eq. 12
contrasts each location only with the same location of other slices, so a map that is constant over
locations and encodes the slice position meets it, and the decoder learns no spatial detail. Here
the anchors are cells of both branches; the positive of a cell is the same cell of the same slice in
the other branch (exact: T_fix is the identity), optionally also the same cell of slices within the
position threshold; the negatives are the other cells of the same and of other slices. A shared random
subset of ``locations`` cells per step bounds the (2 N L)^2 similarity matrix. Related: the
pixel-level InfoNCE of PixPro / DenseCL (Xie et al., CVPR 2021; Wang et al., CVPR 2021).

Cells of zero padding (a crop larger than the slice) carry no image content: with a content
mask, a cell whose content fraction is below one half is left out of every form of the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunetv2_macl.data.augmentation import downsample

from .supcon import (
    branch_positive_mask,
    check_positives,
    check_tau,
    check_threshold,
    float32_math,
    masked_supcon_loss,
    position_positive_mask,
)

DENSE_FORMS = ("supcon", "mse", "byol")
DENSE_CONTRASTS = ("slices", "locations")


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
    contrast: str = "slices",
    locations: int = 64,
    slice_positives: bool = False,
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
        contrast: form="supcon" only: "slices" (eq. 12, one SupCon per location over the slices) or
            "locations" (cells contrasted with the other cells of the same and other slices; module
            docstring).
        locations: contrast="locations": cells sampled per step (shared by the batch; all when the
            grid is smaller).
        slice_positives: contrast="locations": the same cell of slices within ``threshold`` is a
            positive too (otherwise it is neither positive nor negative).

    Returns:
        Scalar float32 loss.
    """
    if form not in DENSE_FORMS:
        raise ValueError(f"form must be one of {DENSE_FORMS}, got {form!r}")
    check_threshold(threshold)
    check_tau(tau, base_temperature)
    check_positives(positives)
    _check_dense_inputs(z_dominant, z_auxiliary)
    if contrast not in DENSE_CONTRASTS:
        raise ValueError(f"contrast must be one of {DENSE_CONTRASTS}, got {contrast!r}")

    n, c = z_dominant.shape[:2]
    cells = content_cells(content, z_dominant.shape[2:]) if content is not None else None  # (N, S_total)
    if form == "supcon" and contrast == "locations":
        return location_contrastive_loss(z_dominant, z_auxiliary, positions, threshold, tau, cells, locations,
                                         slice_positives and positives == "position", base_temperature)
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


def location_contrastive_loss(
    z_dominant: Tensor,
    z_auxiliary: Tensor,
    positions: Tensor | None,
    threshold: float,
    tau: float,
    cells: Tensor | None,
    locations: int,
    slice_positives: bool,
    base_temperature: float | None = None,
) -> Tensor:
    """The spatially discriminative dense term (contrast="locations" of :func:`dense_contrastive_loss`).

    Rows are [dominant cells; auxiliary cells], each sample-major: (sample n, sampled cell l). The cell
    subset is drawn from the global torch RNG (seeded by the pretraining), the same for the whole batch
    so that "the same cell of another slice" exists. With a content mask the subset is drawn from the
    cells that are content in at least one sample (a cell padded in every slice would only waste the
    budget): the first ``locations`` of a random permutation of those, in their order on the grid.
    """
    n, c = z_dominant.shape[:2]
    total = int(torch.tensor(z_dominant.shape[2:]).prod())
    if int(locations) < 1:
        raise ValueError(f"locations must be >= 1, got {locations}")
    device = z_dominant.device
    candidates = (torch.arange(total, device=device) if cells is None
                  else cells.to(device).reshape(n, total).any(dim=0).nonzero().squeeze(1))
    if candidates.numel() == 0:  # no content anywhere: one (padded) cell, which the mask leaves out (loss 0)
        candidates = torch.zeros(1, dtype=torch.long, device=device)
    if candidates.numel() > int(locations):
        chosen = candidates[torch.randperm(candidates.numel(), device=device)[: int(locations)]]
    else:
        chosen = candidates
    k = int(chosen.numel())
    dom = z_dominant.reshape(n, c, total)[:, :, chosen].permute(0, 2, 1).reshape(n * k, c)
    aux = z_auxiliary.reshape(n, c, total)[:, :, chosen].permute(0, 2, 1).reshape(n * k, c)
    features = torch.cat([dom, aux], dim=0)  # (2 N k, C)
    sample = torch.arange(n, device=device).repeat_interleave(k).repeat(2)
    cell = torch.arange(k, device=device).repeat(n).repeat(2)
    same_cell = cell[:, None] == cell[None, :]
    same_sample = sample[:, None] == sample[None, :]
    positive = same_cell & same_sample
    excluded = same_cell & ~same_sample  # the same cell of another slice: neither positive nor negative ...
    if slice_positives:
        if positions is None:
            raise ValueError("slice_positives needs positions, got None")
        near = position_positive_mask(positions, threshold).to(device)  # (N, N)
        near_rows = near[sample[:, None], sample[None, :]]
        positive = positive | (excluded & near_rows)  # ... unless it is near in position and asked for
        excluded = excluded & ~near_rows
    valid = None if cells is None else cells[:, chosen].reshape(n * k).repeat(2)
    return masked_supcon_loss(features, positive, tau=tau, base_temperature=base_temperature, valid=valid,
                              excluded=excluded)


def content_cells(content: Tensor, grid: tuple[int, ...] | torch.Size) -> Tensor:
    """(N, 1, *crop) content mask -> (N, prod(grid)) bool: cells of ``grid`` at least half image.

    Cell j of a grid of stride T sits on crop pixel T*j (METHOD.md, geometry), so its content fraction
    is the mask averaged over a window centred there (the same centred pooling as down()).
    """
    if content.ndim != len(grid) + 2 or content.shape[1] != 1:
        raise ValueError(f"content must have shape (N, 1, *crop) with {len(grid)} spatial axes, got "
                         f"{tuple(content.shape)}")
    crop = tuple(int(s) for s in content.shape[2:])
    grid = tuple(int(g) for g in grid)
    if any(g < 1 or s % g for s, g in zip(crop, grid)):
        raise ValueError(f"the crop {crop} must be an integer multiple of the dense grid {grid}")
    fraction = downsample(content.float(), [g / s for g, s in zip(grid, crop)])
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
        contrast: str = "slices",
        locations: int = 64,
        slice_positives: bool = False,
    ) -> None:
        super().__init__()
        if form not in DENSE_FORMS:
            raise ValueError(f"form must be one of {DENSE_FORMS}, got {form!r}")
        if contrast not in DENSE_CONTRASTS:
            raise ValueError(f"contrast must be one of {DENSE_CONTRASTS}, got {contrast!r}")
        self.contrast = contrast
        self.locations = int(locations)
        self.slice_positives = bool(slice_positives)
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
            contrast=self.contrast,
            locations=self.locations,
            slice_positives=self.slice_positives,
        )

    def extra_repr(self) -> str:
        return (
            f"form={self.form!r}, threshold={self.threshold}, tau={self.tau}, "
            f"positives={self.positives!r}, base_temperature={self.base_temperature}, contrast={self.contrast!r}, "
            f"locations={self.locations}, slice_positives={self.slice_positives}"
        )
