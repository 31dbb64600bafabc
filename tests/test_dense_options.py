"""The dense options on their own: the dominant pixel projection head (``DenseProjector``, ``--dense-head``)
against a written-out reference and in the network (which map it reads), and every ``--dense-*`` option of
``macl_pretrain`` from the command line to the config, the pretrainer's loss and network, with bad values
refused. (Ld per switch, against written-out references, is in tests/test_ablations.py.)"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from nnunetv2_macl.model.macl_network import MACLNetwork
from nnunetv2_macl.model.projectors import DenseProjector
from nnunetv2_macl.run.pretrain import build_parser, config_from_args, main
from nnunetv2_macl.training.config import MACLConfig, resolve_method


# ----------------------------------------------------------------------------- the head alone
def _head(conv_op, norm_op, channels=5, seed=0) -> DenseProjector:
    torch.manual_seed(seed)
    head = DenseProjector(channels, conv_op, norm_op, {"eps": 1e-5, "affine": True} if norm_op else None)
    with torch.no_grad():  # affine parameters away from their (1, 0) initialisation, so that they must act
        for m in head.modules():
            if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                m.weight.copy_(torch.rand(channels) + 0.5)
                m.bias.copy_(torch.randn(channels))
    return head


def _written_out(head: DenseProjector, x: torch.Tensor, norm: bool) -> torch.Tensor:
    """1x1 conv -> instance norm (per sample and channel over the cells, biased variance, eps 1e-5, affine)
    -> LeakyReLU(0.01) -> 1x1 conv, in float64."""
    convs = [m for m in head.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert len(convs) == 2 and all(set(c.kernel_size) == {1} for c in convs)
    x = x.double()
    spatial = tuple(range(2, x.ndim))
    view = (1, -1) + (1,) * len(spatial)

    def conv(c, t):
        out = torch.einsum("oc,nc...->no...", c.weight.double().flatten(1), t)
        return out if c.bias is None else out + c.bias.double().view(view)

    h = conv(convs[0], x)
    if norm:
        nm = next(m for m in head.modules() if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)))
        mean = h.mean(spatial, keepdim=True)
        var = h.var(spatial, unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * nm.weight.double().view(view) + nm.bias.double().view(view)
    h = torch.where(h > 0, h, 0.01 * h)
    return conv(convs[1], h)


@pytest.mark.parametrize("conv_op,norm_op,shape", [
    (nn.Conv2d, nn.InstanceNorm2d, (3, 5, 6, 7)), (nn.Conv3d, nn.InstanceNorm3d, (2, 5, 3, 4, 5))])
def test_dense_head_keeps_the_shape_and_matches_the_written_out_head(conv_op, norm_op, shape):
    head = _head(conv_op, norm_op)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out = head(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _written_out(head, x, norm=True), rtol=1e-5, atol=1e-5)
    # the output is not L2-normalised per cell (the losses normalise): the projection keeps its scale
    assert not torch.allclose(out.norm(dim=1), torch.ones(()), atol=1e-2)


def test_dense_head_normalises_each_sample_on_its_own():
    """Instance norm after the first 1x1 conv: a positive scale and a per-channel offset of one sample's input
    leave that sample's output unchanged, and the other samples' outputs do not depend on it (a batch-wide
    norm, or none, fails both)."""
    head = _head(nn.Conv2d, nn.InstanceNorm2d).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 6, 6, generator=g)
    moved = x.clone()
    moved[0] = 7.0 * x[0] + torch.randn(5, 1, 1, generator=g) * 10
    torch.testing.assert_close(head(moved), head(x), rtol=1e-4, atol=1e-4)
    other = x.clone()
    other[0] = torch.randn(5, 6, 6, generator=g) * 50
    torch.testing.assert_close(head(other)[1:], head(x)[1:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(head(other)[0], head(x)[0], atol=1e-2)


def test_dense_head_without_a_norm_is_pointwise():
    head = _head(nn.Conv2d, None)
    x = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(head(x).double(), _written_out(head, x, norm=False), rtol=1e-5, atol=1e-5)
    poked = x.clone()
    poked[0, :, 1, 2] += 3.0
    changed = (head(poked) - head(x)).abs().sum(1) > 0  # (N, H, W)
    expected = torch.zeros_like(changed)
    expected[0, 1, 2] = True
    assert torch.equal(changed, expected)


# ----------------------------------------------------------------------------- the head in the network
def _network(seed=0):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    return PlainConvUNet(1, 3, [4, 8, 8], nn.Conv2d, 3, [1, 2, 2], 1, 2, 1, conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def test_dense_head_reads_the_partial_decoder_output_of_the_fixed_view():
    """Z_l = g_pix(d_N(e(down(I1)))): the head's input is the dominant branch's decoder stage N output, on
    the T_fix view I1 (not V1, not the bottleneck); the auxiliary dense map does not pass through it."""
    macl = MACLNetwork(_network(), decoder_blocks=2, dense_head=True).eval()
    assert isinstance(macl.pixel_head_dominant, DenseProjector)
    assert macl.dense_channels == 4  # decoder stage 2 of [4, 8, 8]
    g = torch.Generator().manual_seed(4)
    i1, v1, i2, v2 = (torch.randn(2, 1, 32, 32, generator=g) for _ in range(4))
    with torch.no_grad():
        out = macl(i1, v1, i2, v2)
        decoded = macl.partial_decode(macl.network.encoder(macl.down(i1)))
        torch.testing.assert_close(out["dense_dominant"], macl.pixel_head_dominant(decoded))
        # 32 / total stride 4: the 8 x 8 grid of the auxiliary map, the channels of decoder stage 2
        assert out["dense_dominant"].shape == decoded.shape == out["dense_auxiliary"].shape == (2, 4, 8, 8)
        # another V1 leaves Z_l alone, another I1 does not
        torch.testing.assert_close(macl(i1, v2, i2, v2)["dense_dominant"], out["dense_dominant"])
        assert not torch.allclose(macl(i2, v1, i2, v2)["dense_dominant"], out["dense_dominant"])
        # without the head: Z_l is the decoder output itself, Z~_l the same as with the head
        head, macl.pixel_head_dominant = macl.pixel_head_dominant, None
        plain = macl(i1, v1, i2, v2)
        macl.pixel_head_dominant = head
    torch.testing.assert_close(plain["dense_dominant"], decoded)
    torch.testing.assert_close(plain["dense_auxiliary"], out["dense_auxiliary"])
    assert not torch.allclose(plain["dense_dominant"], out["dense_dominant"])
    # the head is not part of the handed-over network, it is a head
    assert any(k.startswith("pixel_head_dominant.") for k in macl.heads_state_dict())
    assert not any("pixel_head_dominant" in k for k in macl.network.state_dict())
    # a loss on Z_l reaches the head and decoder stage N (stage index 1), not the stages past N
    macl.train()
    macl(i1, v1, i2, v2, need=("dense",))["dense_dominant"].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in macl.pixel_head_dominant.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in macl.network.decoder.stages[1].parameters())
    assert all(p.grad is None for p in macl.network.decoder.seg_layers.parameters())


def test_without_dense_head_there_is_no_dominant_pixel_head():
    macl = MACLNetwork(_network(), decoder_blocks=2)
    assert macl.pixel_head_dominant is None
    assert not any(k.startswith("pixel_head_dominant") for k in macl.state_dict())


# ----------------------------------------------------------------------------- --dense-* on the command line
def _config(*argv: str) -> MACLConfig:
    return config_from_args(build_parser().parse_args(["-d", "990", *argv]))


DENSE_OPTIONS = [
    (("--dense-form", "mse"), "dense_form", "mse"),
    (("--dense-form", "byol"), "dense_form", "byol"),
    (("--dense-form", "supcon"), "dense_form", "supcon"),
    (("--dense-contrast", "locations"), "dense_contrast", "locations"),
    (("--dense-contrast", "slices"), "dense_contrast", "slices"),
    (("--dense-locations", "16"), "dense_locations", 16),
    (("--dense-slice-positives",), "dense_slice_positives", True),
    (("--dense-head",), "dense_head", True),
]


def test_dense_defaults_on_the_command_line_are_the_configs():
    cfg = _config()
    assert (cfg.dense_form, cfg.dense_contrast, cfg.dense_locations, cfg.dense_slice_positives, cfg.dense_head) == \
        ("supcon", "slices", 64, False, False)
    defaults = MACLConfig()
    for field in ("dense_form", "dense_contrast", "dense_locations", "dense_slice_positives", "dense_head"):
        assert getattr(cfg, field) == getattr(defaults, field), field


@pytest.mark.parametrize("argv,field,value", DENSE_OPTIONS, ids=[" ".join(a) for a, _, _ in DENSE_OPTIONS])
def test_each_dense_option_sets_its_field_and_nothing_else(argv, field, value):
    base, cfg = dataclasses.asdict(_config()), dataclasses.asdict(_config(*argv))
    assert cfg[field] == value and type(cfg[field]) is type(value)
    assert {k for k in cfg if cfg[k] != base[k]} == ({field} if base[field] != value else set())
    assert resolve_method(config_from_args(build_parser().parse_args(["-d", "990", *argv]))).to_dict()[field] == value


def test_dense_options_together_reach_the_pretrainers_loss_and_network(tiny_dataset, tmp_path):
    from nnunetv2_macl.training.pretrainer import MACLPretrainer
    from test_ablations import small_plans

    cfg = _config("--dense-form", "supcon", "--dense-contrast", "locations", "--dense-locations", "12",
                  "--dense-slice-positives", "--dense-head", "--batch-size", "4", "--num-workers", "0")
    with open(tiny_dataset["preprocessed"] / "dataset.json") as f:
        dataset_json = json.load(f)
    trainer = MACLPretrainer(small_plans(tiny_dataset, n_stages=3), "2d", dataset_json,
                             str(tiny_dataset["preprocessed"]), str(tmp_path / "out"), cfg, torch.device("cpu"))
    trainer.initialize()
    loss = trainer.loss
    assert (loss.dense_form, loss.dense_contrast, loss.dense_locations, loss.dense_slice_positives) == \
        ("supcon", "locations", 12, True)
    assert isinstance(trainer.macl.pixel_head_dominant, DenseProjector)
    meta = trainer.macl_metadata()["config"]
    assert (meta["dense_form"], meta["dense_contrast"], meta["dense_locations"], meta["dense_slice_positives"],
            meta["dense_head"]) == ("supcon", "locations", 12, True, True)


@pytest.mark.parametrize("argv,message", [
    (("--dense-form", "l2"), "invalid choice: 'l2'"),
    (("--dense-contrast", "pixels"), "invalid choice: 'pixels'"),
    (("--dense-locations", "many"), "invalid int value: 'many'"),
    (("--dense-head", "yes"), "unrecognized arguments: yes"),
])
def test_bad_dense_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-d", "990", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("macl_pretrain: error:") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("value", ["1", "0", "-3"])
def test_too_few_dense_locations_are_refused_before_anything_runs(value, capsys, tmp_path, monkeypatch):
    """--dense-locations parses as an int but must be >= 2: one line, exit status 2, nothing written."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    assert main(["-d", "990", "--dense-contrast", "locations", "--dense-locations", value, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"macl_pretrain: error: --dense-locations must be >= 2, got {value}" in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())
