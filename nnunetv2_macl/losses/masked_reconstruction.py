"""Masked reconstruction through the pretrained decoder stages, Lrec (beyond the paper; issue 29).

References:
    - MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (mask most of the
      input in blocks, reconstruct the masked part, loss on the masked part only).
    - SparK: Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
      Modeling", ICLR 2023 (the same for CNNs with a U-shaped decoder).
    - nnssl: Wald et al., "An OpenMind for 3D medical vision self-supervised learning", 2025 (MAE and
      SparK-style masked image modelling were its best pretrainings for nnU-Net-class segmentation).

Why here: MACL's losses reward nothing spatial inside a slice at the decoder's resolution (METHOD.md, "what
the losses do not reward"); the handed-over decoder stages lose 20 Dice points against scratch. Lrec asks
the same stages for the image's content at each location of their own grid, on the *full-resolution*
input, the scale fine-tuning feeds them (the contrastive branches see it shrunk by k).

The geometry follows the package's (METHOD.md): cell j of a grid of stride T sits on input pixel T*j. The
dominant network sees the fixed view with whole blocks of cells set to 0 (the intensity mean under nnU-Net's
z-score normalisation): a block is ``block`` input pixels per axis, a multiple of T; each input pixel belongs
to the cell whose pixel is nearest (the centred window of ``down()``). A 1x1 head on the output of decoder
stage N predicts each cell's input averaged over its centred window (``down()`` of the input by T). The loss
is the squared error averaged over channels and over the masked cells that are mostly image (the content rule
of Ld and LER); the reference is the same error of predicting 0 everywhere (the mean intensity), i.e. the
target's mean square on those cells: a term that learns goes below it. A batch without such cells gives 0
with a graph (zero gradients) and a reference of 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from nnunetv2_macl.data.augmentation import downsample
from nnunetv2_macl.losses.dense_contrastive import content_cells


def check_mask_geometry(crop: Sequence[int], stride: Sequence[int], block: int, ratio: float) -> list[str]:
    """What is wrong with masking ``block``-pixel blocks of a ``crop`` whose reconstruction grid has ``stride``
    (empty list: nothing)."""
    problems = []
    if not 0 < ratio < 1:
        problems.append(f"the mask ratio must be in (0, 1), got {ratio}")
    for axis, (c, t) in enumerate(zip(crop, stride)):
        if block < 1 or block % t:
            problems.append(f"axis {axis}: the mask block ({block} px) must be a multiple of the reconstruction "
                            f"grid's stride {t}")
        elif c % block:
            problems.append(f"axis {axis}: the crop ({c} px) must be a multiple of the mask block ({block} px)")
    return problems


def random_block_mask(n: int, crop: Sequence[int], stride: Sequence[int], block: int, ratio: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """(n, 1, *grid) bool on the reconstruction grid (crop / stride): True where a cell is masked. Exactly
    round(ratio x blocks) of the crop / block blocks are masked per sample (at least one, one left)."""
    problems = check_mask_geometry(crop, stride, block, ratio)
    if problems:
        raise ValueError("; ".join(problems))
    blocks = [c // block for c in crop]
    total = 1
    for b in blocks:
        total *= b
    k = min(max(1, round(ratio * total)), total - 1) if total > 1 else total
    order = torch.argsort(torch.rand(n, total, generator=generator), dim=1)
    mask = torch.zeros(n, total, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    mask = mask.reshape(n, 1, *blocks)
    for axis, t in enumerate(stride):  # blocks -> cells of the grid
        mask = mask.repeat_interleave(block // t, dim=2 + axis)
    return mask


def cell_of_pixel(size: int, stride: int, cells: int, device: torch.device | None = None) -> Tensor:
    """Index of the cell each of ``size`` input pixels belongs to: the one whose pixel T*j is nearest."""
    index = torch.div(torch.arange(size, device=device) + stride // 2, stride, rounding_mode="floor")
    return index.clamp_(max=cells - 1)


def apply_cell_mask(images: Tensor, mask: Tensor) -> Tensor:
    """``images`` (N, C, *crop) with the pixels of masked cells set to 0; ``mask`` (N, 1, *grid)."""
    crop, grid = images.shape[2:], mask.shape[2:]
    pixel_mask = mask.to(images.device)
    for axis, (c, g) in enumerate(zip(crop, grid)):
        if c % g:
            raise ValueError(f"the crop {tuple(crop)} must be a multiple of the grid {tuple(grid)}")
        pixel_mask = pixel_mask.index_select(2 + axis, cell_of_pixel(c, c // g, g, images.device))
    return images.masked_fill(pixel_mask, 0)


def reconstruction_targets(images: Tensor, grid: Sequence[int]) -> Tensor:
    """Each cell's input averaged over its centred window: ``down()`` of ``images`` to ``grid``."""
    crop = images.shape[2:]
    return downsample(images, [g / c for g, c in zip(grid, crop)])


def masked_reconstruction_loss(prediction: Tensor, images: Tensor, mask: Tensor,
                               content: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(Lrec, reference): squared error over the masked content cells, and that of predicting 0 there.

    prediction: (N, C, *grid); images: the unmasked input (N, C, *crop); mask: (N, 1, *grid) bool, True =
    masked; content: optional (N, 1, *crop) content mask (1 image, 0 padding)."""
    grid = prediction.shape[2:]
    if tuple(mask.shape[2:]) != tuple(grid) or mask.shape[0] != prediction.shape[0]:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit the prediction {tuple(prediction.shape)}")
    target = reconstruction_targets(images.float(), grid)
    keep = mask.to(prediction.device).reshape(mask.shape[0], -1)
    if content is not None:
        keep = keep & content_cells(content.to(prediction.device), grid)
    keep = keep.reshape(mask.shape[0], 1, *grid).float()
    cells = keep.sum()
    if cells == 0:
        return prediction.sum() * 0.0, torch.zeros((), device=prediction.device)
    channels = prediction.shape[1]
    error = ((prediction.float() - target) ** 2 * keep).sum() / (cells * channels)
    reference = (target ** 2 * keep).sum() / (cells * channels)
    return error, reference.detach()
