"""Projection heads of MACL (Zeng et al., "Multi-level Asymmetric Contrastive Learning for
Volumetric Medical Image Segmentation Pre-training", IEEE TMI 2024 / arXiv:2309.11876).

Shapes are documented per head; 2-D and 3-D convolutions are chosen from the network's conv op.
"""
from __future__ import annotations

from typing import Type

import torch
from torch import nn


class InstanceProjector(nn.Module):
    """Image-level projector g_ins: global average pool -> Linear(in, hidden) -> ReLU -> Linear(hidden, out).

    (N, C, *spatial) -> (N, out_dim).
    """

    def __init__(self, in_channels: int, hidden_dim: int = 128, out_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(x, 2).mean(dim=2))


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
