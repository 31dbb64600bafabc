"""Masked reconstruction through the pretrained decoder stages (``--recon-weight``; issue 29 part 2)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nnunetv2_macl.data.augmentation import downsample
from nnunetv2_macl.errors import ConfigError
from nnunetv2_macl.losses.masked_reconstruction import (
    apply_cell_mask, cell_of_pixel, check_mask_geometry, masked_reconstruction_loss, random_block_mask,
    reconstruction_targets)
from nnunetv2_macl.model.macl_network import MACLNetwork, reconstruction_stride
from nnunetv2_macl.run.pretrain import main
from nnunetv2_macl.training.checkpoint import load_checkpoint
from nnunetv2_macl.training.config import MACLConfig, resolve_method

from test_resume import common_args, make_small_dataset
from test_transfer import build_network

# dataset ids of this file (each test file keeps its own: one nnU-Net folder tree serves the whole session)
# 921-923


# ------------------------------------------------------------------------------------------------ masks
def test_block_mask_masks_whole_blocks_in_the_asked_share():
    g = torch.Generator().manual_seed(0)
    mask = random_block_mask(5, (32, 48), (2, 2), block=8, ratio=0.6, generator=g)
    assert mask.shape == (5, 1, 16, 24) and mask.dtype == torch.bool
    blocks = mask.reshape(5, 4, 4, 6, 4).permute(0, 1, 3, 2, 4).reshape(5, 4 * 6, 16)
    assert bool(((blocks == blocks[..., :1]).all()))                       # constant inside each block
    assert blocks[..., 0].sum(1).tolist() == [round(0.6 * 24)] * 5          # exactly the share, every sample
    again = random_block_mask(5, (32, 48), (2, 2), block=8, ratio=0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again) and not torch.equal(mask[0], mask[1])
    assert check_mask_geometry((32, 32), (4, 4), 6, 0.6) and check_mask_geometry((36, 32), (4, 4), 8, 0.6)
    with pytest.raises(ValueError, match="multiple of the reconstruction grid's stride"):
        random_block_mask(1, (32, 32), (4, 4), block=6, ratio=0.5)


def test_cell_mask_zeroes_the_pixels_nearest_to_masked_cells_only():
    assert cell_of_pixel(8, 2, 4).tolist() == [0, 1, 1, 2, 2, 3, 3, 3]     # pixel T*j belongs to cell j
    images = torch.randn(2, 1, 8, 8) + 5
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = True
    out = apply_cell_mask(images, mask)
    zero = out == 0
    assert zero[0, 0, 1:3, 3:5].all() and zero.sum() == 4                   # rows/cols 1-2 x 3-4 of sample 0
    assert torch.equal(out[1], images[1])


def test_loss_is_zero_for_the_targets_equal_to_its_reference_for_zero_and_ignores_padding():
    images = torch.randn(3, 2, 16, 16)
    mask = random_block_mask(3, (16, 16), (4, 4), block=8, ratio=0.5, generator=torch.Generator().manual_seed(1))
    target = reconstruction_targets(images, (4, 4))
    assert torch.allclose(target, downsample(images, [0.25, 0.25]))
    loss, ref = masked_reconstruction_loss(target.clone(), images, mask)
    assert loss.item() == pytest.approx(0, abs=1e-10) and ref > 0
    zero = torch.zeros_like(target, requires_grad=True)
    loss0, ref0 = masked_reconstruction_loss(zero, images, mask)
    assert loss0.item() == pytest.approx(ref0.item())
    # cells that are mostly padding take no part: a huge error there changes nothing
    content = torch.zeros(3, 1, 16, 16)
    content[..., :8] = 1                                                    # left half image
    wrong = target.clone()
    wrong[..., 3] += 100                                                    # rightmost cells: padding
    assert masked_reconstruction_loss(wrong, images, mask, content)[0].item() == pytest.approx(0, abs=1e-10)
    # nothing masked is content: 0 with a graph
    empty, ref_empty = masked_reconstruction_loss(zero, images, mask, torch.zeros(3, 1, 16, 16))
    empty.backward()
    assert empty.item() == 0 and ref_empty.item() == 0 and zero.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------------ network
def test_reconstruction_through_the_decoder_stages_learns_on_a_fixed_batch(tiny_dataset):
    """Lrec below its reference after 60 steps on smooth images: the term is learnable through encoder,
    the N decoder stages and the 1x1 head (and it trains those, not the stages beyond N)."""
    torch.manual_seed(0)
    network = build_network(tiny_dataset["plans_file"], seed=0)
    macl = MACLNetwork(network, decoder_blocks=2, reconstruction_head=True)
    stride = reconstruction_stride(network, 2)
    assert macl.reconstruction_stride == stride == [2, 2]
    images = torch.nn.functional.interpolate(torch.randn(8, 1, 4, 4), size=(32, 32), mode="bilinear")
    mask = random_block_mask(8, (32, 32), stride, block=8, ratio=0.5, generator=torch.Generator().manual_seed(2))
    masked = apply_cell_mask(images, mask)
    optimizer = torch.optim.Adam(macl.parameters(), lr=1e-3)
    macl.train()
    ratios = []
    for _ in range(60):
        out = macl(images, images, images, images, need=("reconstruction",), masked=masked)
        assert set(out) == {"reconstruction"} and out["reconstruction"].shape == (8, 1, 16, 16)
        loss, ref = masked_reconstruction_loss(out["reconstruction"], images, mask)
        ratios.append(loss.item() / ref.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ratios[-1] < 0.5 * ratios[0] and ratios[-1] < 0.7, ratios[::10]
    assert network.decoder.stages[2].convs[0].conv.weight.grad is None     # beyond N: untouched
    with pytest.raises(ValueError, match="decoder_blocks >= 1"):
        MACLNetwork(build_network(tiny_dataset["plans_file"]), decoder_blocks=0, reconstruction_head=True)


# ------------------------------------------------------------------------------------------------ config
def test_config_refuses_what_cannot_reconstruct():
    for bad, match in ((dict(method="pcl"), "--decoder-blocks >= 1"), (dict(two_stage=True), "two-stage"),
                       (dict(mask_ratio=1.0), "mask-ratio"), (dict(mask_block=0), "mask-block")):
        with pytest.raises(ConfigError, match=match):
            resolve_method(dataclasses.replace(MACLConfig(recon_weight=1.0), **bad))
    with pytest.raises(ConfigError, match="recon-weight"):
        resolve_method(MACLConfig(recon_weight=-1.0))
    resolve_method(MACLConfig(method="pcl", mask_ratio=1.0))                # off: its fields are not checked


def test_fingerprint_holds_the_reconstruction_fields_only_when_the_term_is_on():
    from nnunetv2_macl.fewlabel.pretraining import config_fingerprint
    from nnunetv2_macl.fewlabel.settings import Settings

    off = config_fingerprint(Settings(methods=("scratch", "macl")), "macl")
    on = config_fingerprint(Settings(methods=("scratch", "macl"), pretrain_extra="--recon-weight 0.5"), "macl")
    assert not {"recon_weight", "mask_ratio", "mask_block"} & off.keys()   # runs recorded before stay valid
    assert (on["recon_weight"], on["mask_ratio"], on["mask_block"]) == (0.5, 0.6, 8)
    assert {k: v for k, v in on.items() if k not in ("recon_weight", "mask_ratio", "mask_block")} == off


# ------------------------------------------------------------------------------------------------ pretraining
def test_pretraining_with_reconstruction_logs_it_against_its_reference(nnunet_env, tiny_dataset, capsys):
    ds = make_small_dataset(nnunet_env, tiny_dataset, 921)
    assert main([*common_args(921, 2), "--recon-weight", "1", "--mask-block", "8", "--crop-size", "32,32"]) == 0
    ckpt = load_checkpoint(str(ds["output"] / "checkpoint_final.pth"))
    log = ckpt["logging"]
    assert len(log["Lrec"]) == len(log["Lrec_ref"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in log["Lrec"] + log["Lrec_ref"])
    assert any(k.startswith("reconstruction_head.") for k in ckpt["heads"])
    assert ckpt["macl"]["config"]["recon_weight"] == 1.0
    printed = capsys.readouterr().out
    assert printed.count("for predicting the mean (ratio") == 2 and "Lrec" in printed
    assert "Lrec weight 1.0 (mask ratio 0.6, blocks of 8 px)" in printed  # the run's header names the term
    # the term off: nothing of it in the run (no head, no values), the shares as before
    ds = make_small_dataset(nnunet_env, tiny_dataset, 922)
    assert main([*common_args(922, 1), "--crop-size", "32,32"]) == 0
    plain = load_checkpoint(str(ds["output"] / "checkpoint_final.pth"))
    assert not any(k.startswith("reconstruction_head.") for k in plain["heads"])
    assert all(math.isnan(v) for v in plain["logging"]["Lrec"])
    assert "Lrec weight" not in capsys.readouterr().out
    # a block that does not fit the reconstruction grid: a one-line error before anything is written
    capsys.readouterr()
    ds = make_small_dataset(nnunet_env, tiny_dataset, 923)
    assert main([*common_args(923, 1), "--recon-weight", "1", "--mask-block", "6", "--crop-size", "32,32"]) == 2
    assert "--mask-block 6 does not fit" in capsys.readouterr().err
    assert not ds["output"].exists()
