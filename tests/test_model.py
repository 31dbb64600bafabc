"""Shapes of the MACL structure on networks nnU-Net plans: the dominant decoder output and the
auxiliary pixel projection agree, and lambda follows the plan's strides."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nnunetv2_macl.model.macl_network import (
    MACLNetwork, downsampling_factors, pretrained_prefixes, required_divisor)


def _network_from_plans(plans_file, configuration="2d", input_channels=1, num_classes=3):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(plans_file) as f:
        plans = json.load(f)
    cm = PlansManager(plans).get_configuration(configuration)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, input_channels, num_classes,
                                 deep_supervision=True)
    return net, plans["configurations"][configuration]["architecture"]["arch_kwargs"]["strides"], cm


def _check_shapes(net, strides, patch_size):
    n_stages = len(strides)
    for n_blocks in range(0, n_stages):
        lam = downsampling_factors(net, n_blocks)
        # lambda from the plan's strides, computed independently here
        expected = [1.0] * len(strides[0])
        for s in strides[n_stages - n_blocks:]:
            expected = [e / si for e, si in zip(expected, s)]
        assert lam == pytest.approx(expected)
        divisor = required_divisor(net, n_blocks)
        total = np.prod(np.array(strides), axis=0)
        assert divisor == [int(round(t / l)) for t, l in zip(total, lam)]
        crop = [max(math.ceil(p / d) * d, 2 * d) for p, d in zip(patch_size, divisor)]
        macl = MACLNetwork(net, n_blocks)
        x = torch.randn(2, 1, *crop)
        with torch.no_grad():
            out = macl(x, x, x, x)
        assert out["dense_dominant"].shape == out["dense_auxiliary"].shape, (n_blocks, crop)
        aux_spatial = [c // int(t) for c, t in zip(crop, total)]
        assert list(out["dense_auxiliary"].shape[2:]) == aux_spatial
        assert out["global_dominant"].shape == out["global_auxiliary"].shape == (2, 128)
        # the dominant bottleneck is the auxiliary one down-sampled by lambda
        dom = out["bottleneck_dominant"].shape[2:]
        assert list(dom) == [round(a * l) for a, l in zip(out["bottleneck_auxiliary"].shape[2:], lam)]


def test_shapes_follow_tiny_plans(tiny_dataset):
    net, strides, cm = _network_from_plans(tiny_dataset["plans_file"])
    _check_shapes(net, strides, cm.patch_size)


def test_shapes_follow_hippocampus_plans(hippocampus_dataset):
    net, strides, cm = _network_from_plans(hippocampus_dataset["plans_file"])
    _check_shapes(net, strides, cm.patch_size)


def test_lambda_for_paper_table_vi():
    """Paper Table VI: stride-2 2-D plans give lambda 0.5, 0.25, 0.125, 0.0625 for N = 1..4."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = PlainConvUNet(1, 6, (8, 8, 8, 8, 8, 8), torch.nn.Conv2d, 3, [1, 2, 2, 2, 2, 2], 1, 2, 1, False,
                        norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"affine": True})
    assert [downsampling_factors(net, n)[0] for n in range(1, 5)] == [0.5, 0.25, 0.125, 0.0625]
    with pytest.raises(ValueError, match="decoder_blocks"):
        downsampling_factors(net, 6)


def test_pretrained_prefixes_cover_encoder_and_n_decoder_stages():
    assert pretrained_prefixes(2) == ["encoder.", "decoder.encoder.", "decoder.stages.0.", "decoder.transpconvs.0.",
                                      "decoder.stages.1.", "decoder.transpconvs.1."]


@pytest.mark.parametrize("mode", ["shared", "independent", "ema"])
def test_encoder_modes(mode, tiny_dataset):
    net, _, cm = _network_from_plans(tiny_dataset["plans_file"])
    macl = MACLNetwork(net, 2, encoder_mode=mode, ema_momentum=0.5)
    has_copy = macl.auxiliary_encoder is not None
    assert has_copy == (mode != "shared")
    x = torch.randn(2, 1, 64, 64)
    out = macl(x, x, x, x)
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    enc_grad = next(net.encoder.parameters()).grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0
    if mode == "ema":
        assert all(p.grad is None for p in macl.auxiliary_encoder.parameters())
        before = next(macl.auxiliary_encoder.parameters()).clone()
        with torch.no_grad():
            next(net.encoder.parameters()).add_(1.0)
        macl.update_ema()
        after = next(macl.auxiliary_encoder.parameters())
        target = next(net.encoder.parameters())
        assert torch.allclose(after, 0.5 * before + 0.5 * target)
