"""Paired cells of MACL's two branches see the same image region (METHOD.md, geometry).

A cell's receptive-field centre is the centre of mass of its footprint on the input. On a copy of the
network whose convolutions all have equal positive weights, no bias and no InstanceNorm (it couples
every cell to the whole map), every activation stays positive, LeakyReLU is the identity and the
network is linear with non-negative weights: cell j's output is sum_p w_j(p) x(p). Two forward passes
then give every centre at once: F(coordinate map) / F(ones) = sum_p p w_j(p) / sum_p w_j(p).

What is asserted: LER's pairing (every weight of the encoder included) coincides to 0.1 cell; Ld's pairing
coincides to 0.1 cell with the decoder's transposed convolutions switched off, i.e. the grid the skip
connections fix. With the transposed convolutions at equal weights like every other convolution (the
network as this measure can see it), nnU-Net's decoder itself pulls every decoder cell to the left (a
transposed convolution with kernel = stride hands fine cells 2i and 2i+1 the coarse cell i, which sits
on fine cell 2i): measured, at most 0.244 cell on the Hippocampus plan, 0.120 on the 7-stage plan and
0.097 on the anisotropic 3-D plan, the same whatever the pairing; learned weights set their own share.
Those figures are asserted as measured (and that the pull is to the left only).

Centres are compared on interior cells only (their footprint is far from the crop border, where zero
padding truncates it); the crop is larger than the training crop for that, which does not change the
geometry (it depends on strides, kernel sizes and paddings only; one convolution per stage instead of
two changes none of them and keeps the footprints, and so the crops, small).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from nnunetv2_macl.losses.equivariance import pair_cells
from nnunetv2_macl.model.macl_network import MACLNetwork

TOLERANCE = 0.1  # dominant cells


def _geometric_copy(network: nn.Module) -> nn.Module:
    net = copy.deepcopy(network).double()
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                setattr(module, name, nn.Identity())
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def _centres(fn, crop: tuple[int, ...]) -> torch.Tensor:
    """(*grid, axes) receptive-field centre (input pixels) of every output cell of the linear ``fn``."""
    with torch.no_grad():
        mass = fn(torch.ones(1, 1, *crop, dtype=torch.float64))[0, 0]
        centres = []
        for axis, size in enumerate(crop):
            shape = [1] * len(crop)
            shape[axis] = size
            # coordinates + 1: strictly positive, so every activation stays positive
            coordinate = (torch.arange(size, dtype=torch.float64) + 1).reshape(1, 1, *shape).expand(1, 1, *crop)
            centres.append(fn(coordinate.contiguous())[0, 0] / mass - 1)
    return torch.stack(centres, dim=-1)


def _interior(grid: tuple[int, ...], margin: tuple[int, ...]) -> tuple[slice, ...]:
    assert all(g > 2 * m for g, m in zip(grid, margin)), f"grid {grid} has no interior with margin {margin}"
    return tuple(slice(m, g - m) for g, m in zip(grid, margin))


def _first_channel(fn):
    return lambda x: fn(x)[:, :1]


def misalignment(network: nn.Module, crop: tuple[int, ...], margin: tuple[int, ...],
                 decoder_blocks: int = 2) -> dict[str, float]:
    """Largest distance, in cells of the compared grid, between the centres of paired interior cells:
    LER (dominant bottleneck Y[j] against down(Y~) at j), Ld (dominant decoder output against the
    auxiliary bottleneck, one to one, along the skip connections), and for comparison the former
    pairing (k x k block averages, for the input and for Y~) and Ld including the transposed
    convolutions' own shift ("_with_transposed_convs": largest distance, mean distance, and the
    largest signed offset, "_rightmost", > 0 where a dominant cell sits to the right of its partner)."""
    macl = MACLNetwork(_geometric_copy(network), decoder_blocks)
    encoder = macl.network.encoder
    k = [int(round(1 / s)) for s in macl.scale]

    def block_down(x):  # the former down(): k x k area average, centred on k*i + (k-1)/2
        return nn.functional.interpolate(x, size=[s // f for s, f in zip(x.shape[2:], k)], mode="area")

    def dominant(x, down=macl.down):
        return encoder(down(x))[-1]

    grid = tuple(dominant(torch.ones(1, 1, *crop, dtype=torch.float64)).shape[2:])
    cell = torch.tensor([c / g for c, g in zip(crop, grid)], dtype=torch.float64)
    inner = _interior(grid, margin)

    def distance(a, b, cell_size):
        return float(((a - b).abs() / cell_size)[inner].max())

    out = {}
    y = _centres(_first_channel(dominant), crop)
    out["LER"] = distance(y, _centres(_first_channel(lambda x: pair_cells(encoder(x)[-1], grid)), crop), cell)
    out["LER_block"] = distance(_centres(_first_channel(lambda x: dominant(x, block_down)), crop),
                                _centres(_first_channel(lambda x: block_down(encoder(x)[-1])), crop), cell)
    dense_grid = tuple(g * f for g, f in zip(grid, k))
    dense_cell = cell / torch.tensor(k, dtype=torch.float64)
    dense_inner = _interior(dense_grid, tuple(m * f for m, f in zip(margin, k)))
    aux_dense = _centres(_first_channel(lambda x: encoder(x)[-1]), crop)

    def dense_offsets(down=macl.down):  # (*interior, axes) signed, in dense cells
        dom_dense = _centres(_first_channel(lambda x: macl.partial_decode(encoder(down(x)))), crop)
        return ((dom_dense - aux_dense) / dense_cell)[dense_inner]

    def dense_distance():
        return float(dense_offsets().abs().max())

    # nnU-Net's transposed convolutions (kernel = stride) give an odd fine cell the input of the coarse
    # cell to its left; with equal weights that pulls decoder cells 0.1-0.24 cell to the left whatever
    # the pairing (learned weights set their own share). The pairing itself is the grid the skips fix:
    # measured with the transposed convolutions switched off, it must be exact.
    signed = dense_offsets()
    out["Ld_with_transposed_convs"] = float(signed.abs().max())
    out["Ld_with_transposed_convs_mean"] = float(signed.abs().mean())
    out["Ld_with_transposed_convs_rightmost"] = float(signed.max())
    block = dense_offsets(block_down)
    out["Ld_block_with_transposed_convs"] = float(block.abs().max())
    out["Ld_block_with_transposed_convs_rightmost"] = float(block.max())
    for t in macl.network.decoder.transpconvs:
        nn.init.zeros_(t.weight)
    out["Ld"] = dense_distance()
    out["Ld_block"] = float(dense_offsets(block_down).abs().max())
    return out


def _plain_unet(n_stages: int, features: list[int], conv=nn.Conv2d, kernels=3, strides=None) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    norm = nn.InstanceNorm2d if conv is nn.Conv2d else nn.InstanceNorm3d
    return PlainConvUNet(1, n_stages, features, conv, kernels, strides or [1] + [2] * (n_stages - 1), 1, 2, 1,
                         conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def test_pairs_coincide_on_a_7_stage_512_plan():
    # nnU-Net's 2d plan for 512x512 images: 7 stages of stride 2 (total stride 64, k = 4 for N = 2)
    d = misalignment(_plain_unet(7, [2, 2, 2, 2, 2, 2, 2]), (2048, 2048), margin=(3, 3))
    assert d["LER"] <= TOLERANCE, d
    assert d["Ld"] <= TOLERANCE, d
    assert d["LER_block"] > 0.3  # the measure can fail: k x k block averages are (k-1)/2 input pixels off
    # the network as built, transposed convolutions included: measured 0.1201 cell, all to the left
    assert d["Ld_with_transposed_convs"] <= 0.125, d
    assert d["Ld_with_transposed_convs_rightmost"] <= 1e-9, d


def test_pairs_coincide_on_the_hippocampus_plan(hippocampus_dataset):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_macl.model.macl_network import fitting_crop_size

    with open(hippocampus_dataset["plans_file"]) as f:
        cm = PlansManager(json.load(f)).get_configuration("2d")
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    assert tuple(fitting_crop_size(network, 2, cm.patch_size)) == (64, 64)  # the training crop
    d = misalignment(network, (512, 512), margin=(4, 4))
    assert d["LER"] <= TOLERANCE, d
    assert d["Ld"] <= TOLERANCE, d
    assert d["LER_block"] > 0.3
    assert d["Ld_block"] > 0.15  # the former down() shifts the dominant decoder 1.5 px = 0.19 cell right
    # the network as built, transposed convolutions included: measured 0.2435 cell (mean 0.227), every
    # interior cell pulled to the left by 0.21-0.24 cell: NOT within 0.1 cell
    assert 0.2 < d["Ld_with_transposed_convs"] <= 0.25, d
    assert d["Ld_with_transposed_convs_rightmost"] <= 1e-9, d
    # why the pairing is asserted with the transposed convolutions off: here the former block down() pushes
    # right by about as much as they pull left and would pass a 0.1-cell test (0.056) by coincidence
    assert d["Ld_block_with_transposed_convs"] < 0.1, d


def test_pairs_coincide_on_an_anisotropic_3d_plan():
    # a 3-D plan with in-plane-only down-sampling first ([1, 3, 3] kernels, [1, 2, 2] strides), as nnU-Net
    # plans for thick slices: lambda differs per axis (k = (2, 4, 4) for N = 2)
    kernels = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    network = _plain_unet(4, [1, 1, 1, 1], nn.Conv3d, kernels, strides)
    d = misalignment(network, (48, 192, 192), margin=(2, 2, 2))
    assert d["LER"] <= TOLERANCE, d
    assert d["Ld"] <= TOLERANCE, d
    assert d["LER_block"] > 0.3 and d["Ld_block"] > 0.15
    # the network as built, transposed convolutions included: measured 0.0974 cell, all to the left (the
    # former block down() is 0.245 cell to the right)
    assert d["Ld_with_transposed_convs"] <= TOLERANCE, d
    assert d["Ld_with_transposed_convs_rightmost"] <= 1e-9, d
    assert d["Ld_block_with_transposed_convs_rightmost"] > 0.2, d
