"""LER compares cells that see the same image region (METHOD.md: down() is average pooling).

Each cell's receptive-field centre is located by the gradient of that one output cell with respect
to the input, on a copy of the network whose convolutions all have equal positive weights and whose
InstanceNorms are removed (they couple every cell to the whole map): the gradient is then the
receptive field's coverage, zero padding included, and its centre of mass is where the cell looks.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from nnunetv2_macl.losses.equivariance import pair_cells
from nnunetv2_macl.model.macl_network import MACLNetwork


def _geometric_copy(network: nn.Module) -> nn.Module:
    net = copy.deepcopy(network)
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                setattr(module, name, nn.Identity())
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def _centres(fn, crop: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """(cells, axes) centre of mass of |d cell / d input| for every cell of ``fn``'s output grid."""
    out = []
    for index in torch.cartesian_prod(*[torch.arange(g) for g in grid]).reshape(-1, len(grid)):
        x = torch.ones(1, 1, *crop, requires_grad=True)
        fn(x)[(slice(None), slice(None)) + tuple(int(i) for i in index)].sum().backward()
        g = x.grad.abs()[0, 0].double()
        coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in g.shape], indexing="ij")
        out.append([float((c * g).sum() / g.sum()) for c in coords])
    return torch.tensor(out)


def _misalignment(network: nn.Module, crop: tuple[int, ...], decoder_blocks: int = 2) -> tuple[float, float]:
    """Largest distance, in dominant cells, between paired cells: with MACL's pairing (average pooling)
    and with the former one (bilinear, align_corners=True, which picks the corner cells)."""
    macl = MACLNetwork(_geometric_copy(network), decoder_blocks)
    encoder = macl.network.encoder

    def dominant(x):
        return encoder(macl.down(x))[-1]

    with torch.no_grad():
        grid = tuple(dominant(torch.ones(1, 1, *crop)).shape[2:])

    def auxiliary(x):
        return pair_cells(encoder(x)[-1], grid)

    def corners(x):
        return nn.functional.interpolate(encoder(x)[-1], size=grid, mode="bilinear", align_corners=True)

    cell = torch.tensor([c / g for c, g in zip(crop, grid)], dtype=torch.float64)
    centres = _centres(dominant, crop, grid)
    ours = ((centres - _centres(auxiliary, crop, grid)).abs() / cell).max().item()
    former = ((centres - _centres(corners, crop, grid)).abs() / cell).max().item()
    return ours, former


def _plain_unet(n_stages: int, features: list[int]) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, n_stages, features, nn.Conv2d, 3, [1] + [2] * (n_stages - 1), 2, 2, 2, conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def test_ler_pairs_cells_of_the_same_region_on_a_7_stage_512_plan():
    # nnU-Net's 2d plan for 512x512 images: 7 stages of stride 2 (channels do not change the geometry)
    ours, former = _misalignment(_plain_unet(7, [4, 8, 8, 8, 8, 8, 8]), (512, 512))
    assert ours <= 0.5, f"paired cells {ours:.2f} dominant cells apart"
    assert former > 0.5  # the measure can fail: the corner pairing does


def test_ler_pairs_cells_of_the_same_region_on_the_hippocampus_plan(hippocampus_dataset):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_macl.model.macl_network import fitting_crop_size

    with open(hippocampus_dataset["plans_file"]) as f:
        cm = PlansManager(json.load(f)).get_configuration("2d")
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    crop = tuple(fitting_crop_size(network, 2, cm.patch_size))
    assert crop == (64, 64)
    ours, former = _misalignment(network, crop)
    assert ours <= 0.5, f"paired cells {ours:.2f} dominant cells apart"
    assert former > 0.5
