"""Every baseline/ablation switch of METHOD.md ("Baselines and ablations") runs through the one
pretraining code path: one optimisation step each, checking the shapes of the projections and
that the loss reaches exactly the parameters the switch says it should."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nnunetv2_macl.training.config import ConfigError, MACLConfig
from nnunetv2_macl.training.pretrainer import MACLPretrainer


def small_plans(tiny_dataset, n_stages: int = 5) -> dict:
    """The tiny dataset's plans with a 5-stage, narrow network so that N = 0..4 all exist."""
    with open(tiny_dataset["plans_file"]) as f:
        plans = json.load(f)
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=n_stages, features_per_stage=[4, 8, 8, 16, 16][:n_stages],
                kernel_sizes=[[3, 3]] * n_stages, strides=[[1, 1]] + [[2, 2]] * (n_stages - 1),
                n_conv_per_stage=[1] * n_stages, n_conv_per_stage_decoder=[1] * (n_stages - 1))
    return plans


def one_step(tiny_dataset, tmp_path, **overrides):
    with open(tiny_dataset["preprocessed"] / "dataset.json") as f:
        dataset_json = json.load(f)
    cfg = MACLConfig(**{"epochs": 2, "batch_size": 4, "num_workers": 0, **overrides})
    trainer = MACLPretrainer(small_plans(tiny_dataset), "2d", dataset_json, str(tiny_dataset["preprocessed"]),
                             str(tmp_path / "out"), cfg, torch.device("cpu"))
    trainer.initialize()
    trainer.on_epoch_start()
    trainer._iteration = 0
    batch = next(iter(trainer.dataloader))
    before = {k: v.detach().clone() for k, v in trainer.macl.named_parameters()}
    components = trainer.train_step(*batch)
    changed = {k for k, v in trainer.macl.named_parameters() if not torch.equal(v.detach(), before[k])}
    return trainer, components, changed


def any_changed(changed, prefix):
    return any(k.startswith(prefix) for k in changed)


@pytest.mark.parametrize("n_blocks", [0, 1, 2, 3, 4])
def test_decoder_blocks(tiny_dataset, tmp_path, n_blocks):
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, decoder_blocks=n_blocks)
    assert trainer.macl.scale == [2.0 ** -n_blocks] * 2
    for i in range(4):  # exactly the first N decoder stages are trained
        assert any_changed(changed, f"network.decoder.stages.{i}.") == (i < n_blocks), (i, n_blocks)
    assert not any_changed(changed, "network.decoder.seg_layers")
    assert any_changed(changed, "network.encoder.")
    weights = trainer.loss.weights
    assert float(comps["total"]) == pytest.approx(
        sum(w * float(comps[n]) for w, n in zip(weights, ("Lg", "Ld", "LER"))), rel=1e-5)
    with torch.no_grad():
        x = torch.randn(2, 1, *trainer.crop_size)
        out = trainer.macl(x, x, x, x)
    # the dense maps of both branches: the auxiliary bottleneck's grid (crop / total stride 16), and
    # the channels of decoder stage N (the bottleneck's for N = 0)
    features = [4, 8, 8, 16, 16]
    grid = tuple(c // 16 for c in trainer.crop_size)
    assert out["dense_dominant"].shape == out["dense_auxiliary"].shape == (2, features[-(n_blocks + 1)], *grid)


@pytest.mark.parametrize("weights,expect", [
    ((1.0, 0.0, 0.0), ("Lg",)), ((0.0, 0.5, 0.0), ("Ld",)), ((0.0, 0.0, 1.0), ("LER",)),
    ((1.0, 0.0, 1.0), ("Lg", "LER")), ((1.0, 2.0, 1.0), ("Lg", "Ld", "LER"))])
def test_each_loss_on_or_off_and_lambda2(tiny_dataset, tmp_path, weights, expect):
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, loss_weights=weights)
    for name in ("Lg", "Ld", "LER"):
        assert (float(comps[name]) != 0.0) == (name in expect), (name, comps)
    total = sum(w * float(comps[n]) for w, n in zip(weights, ("Lg", "Ld", "LER")))
    assert float(comps["total"]) == pytest.approx(total, rel=1e-5)
    assert any_changed(changed, "global_head_dominant") == ("Lg" in expect)
    assert any_changed(changed, "pixel_head_auxiliary") == ("Ld" in expect)
    assert any_changed(changed, "network.encoder.")


@pytest.mark.parametrize("batch_size", [2, 8])
def test_batch_size(tiny_dataset, tmp_path, batch_size):
    trainer, comps, _ = one_step(tiny_dataset, tmp_path, batch_size=batch_size)
    assert next(iter(trainer.dataloader))[0].shape[0] == batch_size
    assert trainer.contrast_samples == 2 * batch_size  # what Lg contrasts, and so its chance value
    assert trainer.lg_chance() == pytest.approx(math.log(2 * batch_size - 1))


@pytest.mark.parametrize("mode", ["shared", "independent", "ema"])
def test_encoder_modes(tiny_dataset, tmp_path, mode):
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, encoder_mode=mode, ema_momentum=0.9)
    assert any_changed(changed, "network.encoder.")
    if mode == "shared":
        assert trainer.macl.auxiliary_encoder is None
    else:  # independent: trained by the loss; ema: moved by the EMA update only
        assert any_changed(changed, "auxiliary_encoder.")


def test_two_stage(tiny_dataset, tmp_path):
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, two_stage=True, global_through_decoder=False)
    # stage 1: encoder with Lg only
    assert float(comps["Ld"]) == 0 and float(comps["Lg"]) > 0
    assert any_changed(changed, "network.encoder.") and not any_changed(changed, "network.decoder.stages")
    # stage 2: encoder frozen, decoder trained with the dense loss
    trainer.current_epoch = 1
    trainer.on_epoch_start()
    batch = next(iter(trainer.dataloader))
    before = {k: v.detach().clone() for k, v in trainer.macl.named_parameters()}
    comps = trainer.train_step(*batch)
    changed = {k for k, v in trainer.macl.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert float(comps["Lg"]) == 0 and float(comps["Ld"]) > 0
    assert not any_changed(changed, "network.encoder.") and any_changed(changed, "network.decoder.stages.0.")


@pytest.mark.parametrize("form", ["supcon", "mse", "byol"])
def test_dense_forms(tiny_dataset, tmp_path, form):
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, dense_form=form)
    assert float(comps["Ld"]) > 0
    assert any_changed(changed, "pixel_head_auxiliary") and any_changed(changed, "network.decoder.stages.1.")


@pytest.mark.parametrize("method", ["pcl", "simclr"])
def test_baselines(tiny_dataset, tmp_path, method):
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, method=method)
    assert trainer.config.decoder_blocks == 0 and trainer.macl.scale == [1.0, 1.0]
    assert float(comps["Ld"]) == 0 and float(comps["LER"]) == 0 and float(comps["Lg"]) > 0
    assert not any_changed(changed, "network.decoder.")
    assert trainer.config.positives == ("instance" if method == "simclr" else "position")


def test_global_through_decoder_switch(tiny_dataset, tmp_path):
    _, _, changed = one_step(tiny_dataset, tmp_path, loss_weights=(1.0, 0.0, 0.0))
    assert any_changed(changed, "network.decoder.stages.1.")  # paper eq. 4: Lg flows through the decoder
    _, _, changed = one_step(tiny_dataset, tmp_path, loss_weights=(1.0, 0.0, 0.0), global_through_decoder=False)
    assert not any_changed(changed, "network.decoder.stages.")  # eq. 9


def test_invalid_switches_are_refused(tiny_dataset, tmp_path):
    for bad in (dict(method="moco"), dict(dense_form="l2"), dict(encoder_mode="frozen"), dict(threshold=0.0),
                dict(loss_weights=(0.0, 0.0, 0.0)), dict(dense_contrast="pixels"), dict(dense_locations=1)):
        with pytest.raises(ConfigError):
            one_step(tiny_dataset, tmp_path, **bad)


def test_dense_contrast_across_locations_and_dense_head(tiny_dataset, tmp_path):
    """The spatially discriminative dense term and the dominant pixel head are switches on the one
    path: with the head, the decoder output is projected before Ld and the head is trained with the
    decoder stage under it; the loss is the locations form (it differs from eq. 12 on the same step)."""
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, loss_weights=(0.0, 1.0, 0.0),
                                       dense_contrast="locations", dense_head=True)
    assert trainer.loss.dense_contrast == "locations"
    assert trainer.macl.pixel_head_dominant is not None
    assert any_changed(changed, "pixel_head_dominant.") and any_changed(changed, "network.decoder.stages.1.")
    assert float(comps["Ld"]) > 0
    plain, plain_comps, plain_changed = one_step(tiny_dataset, tmp_path, loss_weights=(0.0, 1.0, 0.0))
    assert plain.macl.pixel_head_dominant is None
    assert not any(k.startswith("pixel_head_dominant") for k in plain.macl.state_dict())
    assert float(plain_comps["Ld"]) != pytest.approx(float(comps["Ld"]), rel=1e-3)
