"""Every baseline/ablation switch of METHOD.md ("Baselines and ablations") runs through the one
pretraining code path: one optimisation step each, checking the shapes of the projections and
that the loss reaches exactly the parameters the switch says it should."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from nnunetv2_macl.training.checkpoint import load_checkpoint
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
    # every bottleneck cell, padding included: the tiny slices (32 x 32 in a 128 x 64 crop) leave no cell of
    # LER's 2 x 1 grid mostly image, so with the content mask (default) LER is 0, asserted below
    trainer, comps, changed = one_step(tiny_dataset, tmp_path, loss_weights=weights, ler_content_mask=False)
    for name in ("Lg", "Ld", "LER"):
        assert (float(comps[name]) != 0.0) == (name in expect), (name, comps)
    total = sum(w * float(comps[n]) for w, n in zip(weights, ("Lg", "Ld", "LER")))
    assert float(comps["total"]) == pytest.approx(total, rel=1e-5)
    assert any_changed(changed, "global_head_dominant") == ("Lg" in expect)
    assert any_changed(changed, "pixel_head_auxiliary") == ("Ld" in expect)
    assert any_changed(changed, "network.encoder.")
    if expect == ("LER",):  # the default content mask on the same batch: no cell to compare, LER exactly 0
        _, masked_comps, _ = one_step(tiny_dataset, tmp_path / "masked", loss_weights=weights)
        assert float(masked_comps["LER"]) == 0.0 and float(masked_comps["total"]) == 0.0


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


# ----------------------------------------------------------------------------- the dense switches
# Each --dense-* switch is changed alone against a baseline, with the same network initialisation and the
# same batch, and Ld of each training step must equal the value written out below from that step's dense
# maps and the config its checkpoint records. The network has 3 stages and the crop is the 32 x 32 slice
# itself: no padding cell, an 8 x 8 dense grid (64 cells) of 4 channels, so the references stay cheap.
DENSE_GRID_CELLS = 64


def _supcon_reference(features: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor | None = None,
                      tau: float = 0.1) -> float:
    """METHOD.md's SupCon in float64, anchor by anchor: ``positive`` / ``excluded`` are (M, M) bool; an
    excluded pair is neither a positive nor in the anchor's denominator; anchors without a positive are
    skipped."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    sim = f @ f.T / tau
    others = ~torch.eye(f.shape[0], dtype=torch.bool)
    if excluded is not None:
        others &= ~excluded
    losses = []
    for a in range(f.shape[0]):
        pos = positive[a] & others[a]
        if pos.any():
            losses.append(-(sim[a, pos] - torch.logsumexp(sim[a, others[a]], 0)).mean())
    return float(torch.stack(losses).mean())


def _near(positions: torch.Tensor, threshold: float) -> torch.Tensor:
    """|p_a - p_b| < t on every axis (the batch's positions are multiples of 1/16: no ties with t)."""
    p = positions.double().reshape(len(positions), -1)
    return ((p[:, None] - p[None]).abs() < threshold - 1e-9).all(-1)


def ld_slices_reference(z, z_tilde, positions, threshold) -> float:
    """Paper eq. 12: at every cell, SupCon over [Z_l; Z~_l] of the batch with positions [p; p]; mean over cells."""
    positive = _near(torch.cat([positions, positions]), threshold)
    values = [_supcon_reference(torch.cat([z.flatten(2)[:, :, s], z_tilde.flatten(2)[:, :, s]]), positive)
              for s in range(z.flatten(2).shape[2])]
    return sum(values) / len(values)


def ld_locations_reference(z, z_tilde, positions, cells, threshold, slice_positives) -> float:
    """Rows (branch, slice i, cell c) for c in ``cells``: the positive of a row is the same cell of the same
    slice in the other branch (and, with ``slice_positives``, the same cell of slices within t); the same cell
    of another slice is otherwise left out; every other cell of every slice is a negative."""
    n = z.shape[0]
    rows = [(b, i, c) for b in range(2) for i in range(n) for c in cells]
    features = torch.stack([(z if b == 0 else z_tilde).flatten(2)[i, :, c] for b, i, c in rows])
    near = _near(positions, threshold)
    m = len(rows)
    positive = torch.zeros(m, m, dtype=torch.bool)
    excluded = torch.zeros(m, m, dtype=torch.bool)
    for r, (_, i, c) in enumerate(rows):
        for q, (_, j, d) in enumerate(rows):
            if c == d and i == j:
                positive[r, q] = True
            elif c == d and slice_positives and bool(near[i, j]):
                positive[r, q] = True
            elif c == d:
                excluded[r, q] = True
    return _supcon_reference(features, positive, excluded)


def expected_ld(run) -> float:
    """Ld of ``run``'s step from its dense maps and its recorded config."""
    cfg, z, z_tilde = run.config, run.z.double(), run.z_tilde.double()
    if cfg["dense_form"] == "mse":  # Table VII: mean over samples, channels and cells
        return float(((z - z_tilde) ** 2).mean())
    if cfg["dense_form"] == "byol":  # Table VII: 2 - 2 cos per cell, mean over samples and cells
        cos = (z * z_tilde).sum(1) / (z.norm(dim=1) * z_tilde.norm(dim=1))
        return float((2 - 2 * cos).mean())
    if cfg["dense_contrast"] == "slices":
        return ld_slices_reference(z, z_tilde, run.positions, cfg["threshold"])
    cells = list(range(DENSE_GRID_CELLS))
    if cfg["dense_locations"] < DENSE_GRID_CELLS:  # the subset the step drew: a randperm of the global RNG
        generator = torch.Generator().set_state(run.rng)
        cells = torch.randperm(DENSE_GRID_CELLS, generator=generator)[:cfg["dense_locations"]].tolist()
    return ld_locations_reference(z, z_tilde, run.positions, cells, cfg["threshold"], cfg["dense_slice_positives"])


def dense_step(tiny_dataset, tmp_path, name: str, **switches) -> SimpleNamespace:
    """One training step on the 3-stage network; keeps the dense maps of the batch before the step (T_fix is
    the identity: both branches see the batch itself), the global RNG state the step started from, the
    parameters it changed and the config of the checkpoint written after it."""
    with open(tiny_dataset["preprocessed"] / "dataset.json") as f:
        dataset_json = json.load(f)
    cfg = MACLConfig(**{"epochs": 2, "batch_size": 4, "num_workers": 0, **switches})
    trainer = MACLPretrainer(small_plans(tiny_dataset, n_stages=3), "2d", dataset_json,
                             str(tiny_dataset["preprocessed"]), str(tmp_path / "out"), cfg, torch.device("cpu"))
    trainer.initialize()
    trainer.on_epoch_start()
    trainer._iteration = 0
    images, positions, content = next(iter(trainer.dataloader))
    with torch.no_grad():
        out = trainer.macl(images, images, images, images, need=("dense",))
    head = copy.deepcopy(trainer.macl.pixel_head_dominant)
    before = {k: v.detach().clone() for k, v in trainer.macl.named_parameters()}
    rng = torch.random.get_rng_state()
    components = trainer.train_step(images, positions, content)
    changed = {k for k, v in trainer.macl.named_parameters() if not torch.equal(v.detach(), before[k])}
    path = tmp_path / f"{name}.pth"
    trainer.save_checkpoint(str(path))
    saved = load_checkpoint(str(path))
    return SimpleNamespace(trainer=trainer, images=images, positions=positions, content=content,
                           z=out["dense_dominant"], z_tilde=out["dense_auxiliary"], head=head, rng=rng,
                           components=components, changed=changed, config=saved["macl"]["config"],
                           heads=saved["heads"])


# (switch, value, baseline): the baseline is the defaults plus what the switch needs in order to act
DENSE_SWITCHES = [
    ("dense_form", "mse", {}),
    ("dense_form", "byol", {}),
    ("dense_contrast", "locations", {}),  # 64 cells <= --dense-locations 64: every cell, no draw
    ("dense_locations", 16, {"dense_contrast": "locations"}),  # 16 of the 64 cells drawn
    ("dense_slice_positives", True, {"dense_contrast": "locations", "threshold": 1.0}),  # t = 1: all slices near
    ("dense_head", True, {}),
]


@pytest.mark.parametrize("switch,value,baseline", DENSE_SWITCHES,
                         ids=[f"{s}={v}" for s, v, _ in DENSE_SWITCHES])
def test_each_dense_switch_alone(tiny_dataset, tmp_path, switch, value, baseline):
    base = dense_step(tiny_dataset, tmp_path, "base", **baseline)
    run = dense_step(tiny_dataset, tmp_path, "switched", **{**baseline, switch: value})
    # one switch apart: the same batch, the same initialisation (the auxiliary dense map), no padding
    assert torch.equal(base.images, run.images) and torch.equal(base.positions, run.positions)
    assert torch.equal(base.z_tilde, run.z_tilde)
    assert bool(base.content.all()) and base.z.shape == (4, 4, 8, 8)
    # the checkpoint records the switch, and the configs differ in nothing else
    assert {k for k in base.config if base.config[k] != run.config[k]} == {switch}
    assert run.config[switch] == value
    # each step's Ld is the written-out value of its own config; the switch changed it
    for r in (base, run):
        assert float(r.components["Ld"]) == pytest.approx(expected_ld(r), rel=1e-4), r.config
    assert float(run.components["Ld"]) != pytest.approx(float(base.components["Ld"]), rel=1e-3)
    # the dense term trains the auxiliary pixel head and the decoder stage N under the dominant dense map
    for r in (base, run):
        assert any_changed(r.changed, "pixel_head_auxiliary.") and any_changed(r.changed, "network.decoder.stages.1.")
    if switch == "dense_head":
        # the head reads the decoder output: Z_l = g_pix(d_N), d_N being the baseline's Z_l
        torch.testing.assert_close(run.z, run.head(base.z), rtol=1e-5, atol=1e-6)
        assert any_changed(run.changed, "pixel_head_dominant.")
        assert any(k.startswith("pixel_head_dominant.") for k in run.heads)
    assert not any(k.startswith("pixel_head_dominant.") for k in base.heads)
    assert base.trainer.macl.pixel_head_dominant is None
    if switch == "dense_locations":
        torch.testing.assert_close(run.z, base.z, rtol=0, atol=0)  # only the cells drawn differ


@pytest.mark.parametrize("switch,value", [("dense_locations", 16), ("dense_slice_positives", True)])
def test_location_options_leave_eq12_alone(tiny_dataset, tmp_path, switch, value):
    """--dense-locations and --dense-slice-positives belong to --dense-contrast locations: with eq. 12 they
    are recorded but the step is the same to the last bit."""
    base = dense_step(tiny_dataset, tmp_path, "base")
    run = dense_step(tiny_dataset, tmp_path, "switched", **{switch: value})
    assert run.config[switch] == value and base.config[switch] != value
    assert float(run.components["Ld"]) == float(base.components["Ld"])
    assert float(run.components["total"]) == float(base.components["total"])
