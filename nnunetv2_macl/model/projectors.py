"""Projection heads of MACL (Zeng et al., "Multi-level Asymmetric Contrastive Learning for Medical
Image Segmentation Pre-training", IEEE JBHI 2026, doi:10.1109/JBHI.2026.3669549 / arXiv:2309.11876).

Shapes are documented per head; 2-D and 3-D convolutions are chosen from the network's conv op.

The image-level descriptor (what g_ins pools before its MLP) is a switch, because the paper's global
average pool carries almost no per-image information on nnU-Net's networks: every stage ends with
InstanceNorm (+ LeakyReLU), which fixes each channel's spatial mean by the norm's affine parameters,
not by the image (METHOD.md, "The global descriptor"; the measurement that chose the default is in
docs/RESULTS.md, "Image-level descriptor").
"""
from __future__ import annotations

from typing import Type

import torch
from torch import nn

GLOBAL_POOLINGS = ("max", "attention", "avg")


class GlobalDescriptor(nn.Module):
    """(N, C, *spatial) -> (N, C): one vector per image.

    pooling:
        "max": per-channel spatial maximum. Where an instance-normalised channel peaks, and how
            high, depends on the image, unlike its mean.
        "attention": softmax-weighted mean with weights from a learned 1x1 convolution (attention
            pooling, Ilse et al., ICML 2018): the weights follow the image content.
        "avg": global average pool (the paper's g_ins; near image-independent after InstanceNorm).
    """

    def __init__(self, in_channels: int, pooling: str = "max") -> None:
        super().__init__()
        if pooling not in GLOBAL_POOLINGS:
            raise ValueError(f"pooling must be one of {GLOBAL_POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.attention = nn.Linear(in_channels, 1) if pooling == "attention" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.flatten(x, 2)  # (N, C, L)
        if self.pooling == "avg":
            return flat.mean(dim=2)
        if self.pooling == "max":
            return flat.amax(dim=2)
        weights = torch.softmax(self.attention(flat.transpose(1, 2)).squeeze(-1), dim=1)  # (N, L)
        return torch.einsum("ncl,nl->nc", flat, weights)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"


class InstanceProjector(nn.Module):
    """Image-level projector g_ins: descriptor -> BatchNorm -> Linear(in, hidden) -> ReLU ->
    Linear(hidden, out).

    The BatchNorm (as in SimCLR's projection head, Chen et al., ICML 2020) takes out the component
    all images share: max-pooled descriptors of real slices are a large common vector plus a small
    per-image part (mean 2.4, spread 0.45 on Hippocampus), and without it the MLP locked onto the
    common part and its outputs collapsed to one vector (docs/RESULTS.md, "Image-level descriptor").

    (N, C, *spatial) -> (N, out_dim). :meth:`describe` returns the pooled descriptor alone (N, C).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 128, out_dim: int = 128, pooling: str = "max") -> None:
        super().__init__()
        self.descriptor = GlobalDescriptor(in_channels, pooling)
        self.mlp = nn.Sequential(nn.BatchNorm1d(in_channels), nn.Linear(in_channels, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        return self.descriptor(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.descriptor(x))


class PixelProjector(nn.Module):
    """Pixel-level projector of the auxiliary branch, g~_pix: two (conv3x3 - norm - LeakyReLU) layers,
    in_channels -> out_channels -> out_channels, so that its output matches the dominant decoder's.

    (N, in, *S) -> (N, out, *S).
    """

    def __init__(self, in_channels: int, out_channels: int, conv_op: Type[nn.Module], norm_op: Type[nn.Module] | None,
                 norm_op_kwargs: dict | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(2):
            layers.append(conv_op(channels, out_channels, kernel_size=3, padding=1, bias=norm_op is None))
            if norm_op is not None:
                layers.append(norm_op(out_channels, **(norm_op_kwargs or {})))
            layers.append(nn.LeakyReLU(0.01, inplace=True))
            channels = out_channels
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DenseProjector(nn.Module):
    """Pixel-level projector of the dominant branch (beyond the paper, which contrasts the decoder output
    itself): 1x1 conv - norm - LeakyReLU - 1x1 conv, channels kept. With it the contrastive space is the
    head's output, as for every other loss of MACL, and the handed-over decoder stage need not be
    invariant to what the loss discards (SimCLR's argument for a projection head, Chen et al., ICML 2020).

    (N, C, *S) -> (N, C, *S).
    """

    def __init__(self, channels: int, conv_op: Type[nn.Module], norm_op: Type[nn.Module] | None,
                 norm_op_kwargs: dict | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_op(channels, channels, kernel_size=1, bias=norm_op is None)]
        if norm_op is not None:
            layers.append(norm_op(channels, **(norm_op_kwargs or {})))
        layers += [nn.LeakyReLU(0.01, inplace=True), conv_op(channels, channels, kernel_size=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
