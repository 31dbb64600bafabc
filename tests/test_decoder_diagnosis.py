"""nnunetv2_macl.diagnosis (and its command line pretrain/decoder_diagnosis.py): the measures on tensors with
known answers, then the whole diagnosis on the tiny synthetic dataset with a checkpoint whose last
pretrained decoder stage is made spatially constant."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_macl.diagnosis import data, finetune, networks, probes, run, stage_stats, variance
from nnunetv2_macl.training.checkpoint import save_checkpoint_atomic

_SCRIPT = Path(__file__).parents[1] / "pretrain" / "decoder_diagnosis.py"
_spec = importlib.util.spec_from_file_location("decoder_diagnosis", _SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


# ------------------------------------------------------------------------------------- (a) decomposition
def test_decomposition_sums_to_total_variance_with_unequal_slices():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(5, 4 + i % 3, 6, generator=g) * (1 + i) + i for i in range(7)]
    d = variance.variance_decomposition(maps)
    values = np.concatenate([m.flatten(1).double().numpy() for m in maps], axis=1)  # (C, all cells)
    np.testing.assert_allclose(d["spatial"] + d["across"], values.var(1), rtol=1e-10)
    np.testing.assert_allclose(d["total"], values.var(1), rtol=1e-10)
    # equal sizes: spatial is the plain mean of the per-slice variances, across the variance of the means
    same = [m[:, :4, :6] for m in maps]
    e = variance.variance_decomposition(same)
    stack = torch.stack(same).double().flatten(2)
    np.testing.assert_allclose(e["spatial"], stack.var(-1, unbiased=False).mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(e["across"], stack.mean(-1).var(0, unbiased=False).numpy(), rtol=1e-10)


def test_spatially_constant_map_has_spatial_fraction_zero_and_position_share_one():
    positions = np.arange(1, 11) / 10  # one slice per position bin
    # each channel constant over the slice, a different function of the position per channel
    maps = [torch.stack([torch.full((8, 8), float(p)), torch.full((8, 8), float(p) ** 2)]) for p in positions]
    d = variance.variance_decomposition(maps, positions)
    assert d["spatial_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert d["position_share"] == pytest.approx(1.0)
    assert d["dead_channels"] == 0
    # the same spatial pattern on every slice: all variance is spatial
    pattern = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert variance.variance_decomposition([pattern.clone() for _ in range(6)])["spatial_fraction"] == pytest.approx(1.0)
    # a channel constant everywhere is dead and left out of the averages
    flat = variance.variance_decomposition([torch.ones(2, 4, 4) for _ in range(3)])
    assert flat["dead_channels"] == 2 and math.isnan(flat["spatial_fraction"])


def test_content_cells_follow_nnunet_cell_centres():
    # stride 4 on a 32-pixel canvas: cells centred on pixels 0, 4, ..., 28; an image of 9 pixels covers 0..8
    assert variance.content_cells((9, 32), (32, 32), (8, 8)) == (3, 8)
    assert variance.content_cells((1, 1), (32, 32), (2, 2)) == (1, 1)


# ------------------------------------------------------------------------------------------- (b) probe
def test_upsampled_cell_j_sits_on_pixel_stride_times_j():
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    up = probes.upsample_logits(logits, (16, 20))
    assert up.shape == (2, 3, 16, 20)
    torch.testing.assert_close(up[..., ::4, ::4], logits)


def _blob_labels(n: int = 24, size: int = 32, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        for c in (1, 2):
            cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(3, 6)
            labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = c
    labels[:, :, -3:] = -1  # padding: never in the loss
    return torch.from_numpy(labels)


def test_probe_reads_one_hot_features_and_not_constant_ones():
    labels = _blob_labels()
    train, val = labels[:16], labels[16:]
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 3).permute(0, 3, 1, 2).float()
    constant = torch.ones(len(labels), 4, 32, 32)
    scores = {}
    for name, feats in (("onehot", onehot), ("constant", constant)):
        probe = probes.train_linear_probe(feats[:16], train, 3, iters=150, lr=5e-2, batch_size=8, seed=0)
        acc = probes.DiceAccumulator(3)
        for i in range(len(val)):
            pred = probes.probe_predict(probe, feats[16 + i:17 + i], (32, 32))[0, :, :-3]
            acc.add_volume(str(i), pred.numpy(), val[i, :, :-3].numpy())
        scores[name] = acc.result()["mean_dice"]
    assert scores["onehot"] > 0.98, scores
    assert scores["constant"] < 0.5, scores


def test_dice_accumulator_per_volume_and_global():
    acc = probes.DiceAccumulator(3)
    ref = np.array([[1, 1, 0, 0], [2, 0, 0, 0]])
    acc.add_volume("a", ref, ref)  # perfect
    acc.add_volume("b", np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), np.array([[1, 1, 0, 0], [0, 0, 0, 0]]))
    r = acc.result()
    assert r["per_class"]["1"]["dice_per_volume_mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["per_class"]["1"]["dice_global"] == pytest.approx(2 * 3 / (3 + 4))
    # class 2 is absent from volume b's reference and prediction: only volume a counts
    assert r["per_class"]["2"]["dice_per_volume_mean"] == pytest.approx(1.0)


def test_probe_batches_oversample_foreground_like_nnunet():
    forced = probes.draw_foreground_forced(32)
    assert sum(forced) == 32 - round(32 * (1 - 0.33)) and forced[-1] and not forced[0]
    rng = np.random.default_rng(0)
    with_class = {1: np.array([7]), 2: np.array([9])}
    idx = probes.draw_probe_slices(rng, 32, 50, with_class)
    assert set(idx[np.array(forced)]) <= {7, 9}


def test_windows_and_background_phase():
    assert finetune.windows(list(range(25))) == [4.5, 14.5, 22.0]
    fg = [0.4, 0.2, 0.0, 0.0, 0.01, 0.03, 0.05]
    assert finetune.leaves_background_phase(fg, 0.03) == 5
    assert finetune.leaves_background_phase(fg[:5], 0.03) is None  # still background-only at the end
    assert finetune.leaves_background_phase([0.5, 0.4], 0.03) is None  # never entered it


# ------------------------------------------------------------------------------- script on the tiny data
@pytest.fixture(scope="module")
def flat_decoder_checkpoint(tiny_dataset, tmp_path_factory):
    """A checkpoint in the macl_pretrain format: every tensor perturbed, and the last convolution of
    decoder stage 2 zeroed, so that stage's output is one constant per channel (spatially and across slices)."""
    setup = networks.load_setup(str(tiny_dataset["preprocessed"]))
    net = networks.build_network(setup, seed=99)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        last = net.decoder.stages[1].convs[-1].conv
        last.weight.zero_()
        last.bias.zero_()
    cm = setup.configuration_manager
    prefixes = ["encoder.", "decoder.encoder."] + [f"decoder.{m}.{i}." for i in range(2) for m in ("stages", "transpconvs")]
    ckpt = {"network_weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "macl": {"plans_identifier": "nnUNetPlans", "configuration": "2d", "dataset_name": tiny_dataset["name"],
                     "network_arch_class_name": cm.network_arch_class_name,
                     "network_arch_init_kwargs": cm.network_arch_init_kwargs,
                     "network_arch_init_kwargs_req_import": list(cm.network_arch_init_kwargs_req_import),
                     "input_channels": setup.num_input_channels, "decoder_blocks": 2,
                     "pretrained_prefixes": prefixes, "lambda": [0.25, 0.25], "method": "macl"},
            "heads": {}}
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_final.pth"
    save_checkpoint_atomic(ckpt, str(path))
    return path


def _cases(tiny_dataset) -> list[str]:
    return sorted(p.name[:-5] for p in Path(tiny_dataset["data_folder"]).glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))


def test_parameter_groups_cover_every_parameter_once(tiny_dataset):
    net = networks.build_network(networks.load_setup(str(tiny_dataset["preprocessed"])), seed=0)
    groups = finetune.parameter_groups(net)
    n_enc, n_dec = len(net.encoder.stages), len(net.decoder.stages)
    assert list(groups) == [f"encoder.stages.{i}" for i in range(n_enc)] + \
        [f"decoder.stages.{j}" for j in range(n_dec)] + ["seg_layers"]
    counted = sum(p.numel() for ps in groups.values() for p in ps)
    assert counted == sum(p.numel() for p in net.parameters())


def test_same_seed_gives_identical_random_init(tiny_dataset):
    setup = networks.load_setup(str(tiny_dataset["preprocessed"]))
    a, b = networks.build_network(setup, 3), networks.build_network(setup, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pre_norm_features_are_the_last_convolution_before_norm_and_nonlinearity(tiny_dataset):
    """The pre-norm map of a stage, passed through its last block's norm and nonlinearity, is the stage output
    (so it is that convolution's output, and the hooks leave the forward pass as it was)."""
    setup = networks.load_setup(str(tiny_dataset["preprocessed"]))
    net = networks.build_network(setup, 3).eval()
    x = torch.randn(3, 1, *setup.patch_size)
    feats = networks.slice_features(net, x, 2, chunk=2, pre_norm=True)
    plain = networks.slice_features(net, x, 2, chunk=2)
    assert set(plain) < set(feats)
    for s, out in plain.items():
        assert torch.equal(out, feats[s]), s
        stage = net.encoder.stages[int(s.split(".")[-1])] if s.startswith("encoder") else \
            net.decoder.stages[int(s.split(".")[-1])]
        block = [m for m in stage.modules() if hasattr(m, "conv") and hasattr(m, "norm")][-1]
        with torch.no_grad():
            again = block.nonlin(block.norm(feats[s + networks.PRE_NORM].clone()))
        assert torch.allclose(again, out, atol=1e-5), s
        assert not torch.allclose(feats[s + networks.PRE_NORM], out, atol=1e-3), s


def test_poly_lr_is_nnunets_per_epoch_decay():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = PolyLRScheduler(opt, 1e-2, 40)
    for epoch in range(40):  # nnU-Net steps it at the start of every epoch with the epoch number
        sched.step(epoch)
        for it in (epoch * 25, epoch * 25 + 24):
            assert finetune.poly_lr(1e-2, it, 1000, 25) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), it
    assert finetune.poly_lr(1e-2, 5000, 1000, 25) == pytest.approx(1e-2 * (1 / 40) ** 0.9)  # stays at the last epoch
    assert finetune.poly_lr(1e-2, 500, 0, 25) == 1e-2


def finite(value, where=None) -> float:
    """``value`` as a float, failing when it is missing (None / JSON null) or not finite."""
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (where, value)
    assert math.isfinite(value), (where, value)
    return float(value)


def test_script_end_to_end(tiny_dataset, flat_decoder_checkpoint, tmp_path):
    cases = _cases(tiny_dataset)
    out = tmp_path / "diag"
    iters = 12
    # probe lr 5e-2 x 40 steps: enough for the random network's last stage to score (~0.3 Dice), in ~1 s
    result = run.run_diagnosis(str(flat_decoder_checkpoint), str(tiny_dataset["preprocessed"]), cases[:3], cases[3:6],
                              str(out), seed=1, max_val_slices=24, probe_iters=40, probe_lr=5e-2, probe_batch=8,
                              finetune_iters=iters, finetune_batch=4, say=lambda *_: None)
    for f in ("decoder_diagnosis.json", "decoder_diagnosis.md", "decoder_diagnosis_finetune.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "decoder_diagnosis.json").read_text())
    assert saved["pretrained_decoder_stages"] == [0, 1]
    n_enc = len([s for s in saved["stages"] if s.startswith("encoder")])
    assert saved["stages"][-2:] == ["decoder.stages.0", "decoder.stages.1"]

    # (a) the zeroed stage is constant: every channel dead for the pretrained network, none at random init
    pre = saved["variance"]["pretrained"]["full_resolution"]
    rnd = saved["variance"]["random"]["full_resolution"]
    assert pre["decoder.stages.1"]["dead_channels"] == pre["decoder.stages.1"]["channels"]
    assert rnd["decoder.stages.1"]["dead_channels"] == 0
    assert 0 < finite(rnd["decoder.stages.1"]["spatial_fraction"]) <= 1
    # no live channel on the zeroed stage: its fractions are undefined (null), not a number; every other
    # stage of both networks, and that stage at random init, has them all
    assert pre["decoder.stages.1"]["spatial_fraction"] is None and pre["decoder.stages.1"]["position_share"] is None
    for name, net in (("pretrained", pre), ("random", rnd)):
        for s in saved["stages"]:
            assert net[s]["num_slices"] == 24
            if name == "pretrained" and s == "decoder.stages.1":
                continue
            for key in ("spatial_fraction", "position_share", "mean_total_variance"):
                finite(net[s][key], (name, s, key))
            assert 0 <= net[s]["spatial_fraction"] <= 1 and 0 <= net[s]["position_share"] <= 1 + 1e-9
    # the encoder-only start (the decoder stages' reference): the pretrained encoder itself, so its encoder
    # stages measure exactly as the pretrained network's; its decoder is nnU-Net's init, not the zeroed stage
    enc = saved["variance"]["encoder"]["full_resolution"]
    for s in saved["stages"][:n_enc]:
        for key in ("spatial_fraction", "position_share", "mean_total_variance"):
            assert enc[s][key] == pytest.approx(pre[s][key], rel=1e-5, abs=1e-12), (s, key)
    assert enc["decoder.stages.1"]["dead_channels"] == 0
    assert enc["decoder.stages.1"]["mean_total_variance"] != pytest.approx(
        rnd["decoder.stages.1"]["mean_total_variance"], rel=1e-3)  # another encoder feeds it than at random init
    # before the InstanceNorm: every stage of every network measured there too
    for s in saved["stages"]:
        assert s + networks.PRE_NORM in pre and s + networks.PRE_NORM in rnd and s + networks.PRE_NORM in enc
        assert pre[s + networks.PRE_NORM]["num_slices"] == 24
        assert 0 <= finite(rnd[s + networks.PRE_NORM]["spatial_fraction"], s) <= 1
    dom = saved["variance"]["pretrained"]["dominant_branch"]
    assert set(dom) == {f"encoder.stages.{n_enc - 1}", "decoder.stages.0", "decoder.stages.1"}

    # (b) a probe for every stage of both networks; on the constant stage it cannot beat the random features
    probe = saved["probe"]
    assert set(probe["pretrained"]) == set(probe["encoder"]) == set(probe["random"]) == set(saved["stages"])
    for name in ("pretrained", "encoder", "random"):
        for s in saved["stages"]:
            assert probe[name][s]["num_volumes"] == 3
            assert 0 <= finite(probe[name][s]["mean_dice"], (name, s)) <= 1
    flat = finite(probe["pretrained"]["decoder.stages.1"]["mean_dice"])
    rand = finite(probe["random"]["decoder.stages.1"]["mean_dice"])
    # one constant per channel: at best one class everywhere, far below the random features' probe
    assert rand > flat + 0.1, (flat, rand)

    # (c) K finite losses and a gradient norm per group and iteration for every start
    ft = saved["finetune"]
    assert list(ft) == list(networks.START_NAMES)
    groups = list(ft["scratch"]["grad_norm"])
    assert "seg_layers" in groups and "decoder.stages.0" in groups and "encoder.stages.0" in groups
    for start, log in ft.items():
        # nnU-Net's poly decay over the protocol's 1,000 iterations of 25: epoch 0 at 1e-2 for 12 iterations
        assert log["lr"] == [pytest.approx(finetune.poly_lr(1e-2, i, 1000, 25)) for i in range(iters)]
        assert len(log["loss"]) == iters and all(math.isfinite(v) for v in log["loss"]), start
        assert list(log["grad_norm"]) == groups
        for g in groups:
            assert len(log["grad_norm"][g]) == iters, (start, g)
            assert all(finite(v, (start, g)) >= 0 for v in log["grad_norm"][g])
        assert len(log["windows_of_10"]["loss"]) == 2 and all(finite(v, start) for v in log["windows_of_10"]["loss"])
        # the clip bites exactly where the total norm before clipping exceeds 12
        assert log["clip_fraction"] == pytest.approx(np.mean(np.array(log["grad_norm_total"]) > 12.0))
        assert log["augmentation"]["initial_patch_size"] == list(finetune.nnunet_training_transforms(
            networks.load_setup(str(tiny_dataset["preprocessed"])))[1])  # on by default
    assert ft["scratch"]["transferred_groups"] == []
    assert not any(g.startswith("decoder") for g in ft["encoder"]["transferred_groups"])
    assert {"decoder.stages.0", "decoder.stages.1"} <= set(ft["pretrained"]["transferred_groups"])
    assert ft["pretrained_norms_reset"]["transferred_groups"] == ft["pretrained"]["transferred_groups"]
    assert "decoder.stages.0" in ft["stage0_only"]["transferred_groups"]
    assert "decoder.stages.1" not in ft["stage0_only"]["transferred_groups"]
    # identical data and init apart from the transfer: different starts, different first losses, pair by pair
    first = {start: finite(log["loss"][0], start) for start, log in ft.items()}
    assert first["scratch"] != pytest.approx(first["encoder"], rel=1e-6)
    assert first["encoder"] != pytest.approx(first["pretrained"], rel=1e-6)
    assert first["scratch"] != pytest.approx(first["pretrained"], rel=1e-6)
    assert first["pretrained_norms_reset"] != pytest.approx(first["pretrained"], rel=1e-6)  # the norms were perturbed
    assert first["stage0_only"] != pytest.approx(first["pretrained"], rel=1e-6)
    assert set(saved["finetune_validation"]) == set(networks.START_NAMES)
    for start, val in saved["finetune_validation"].items():
        assert val["num_volumes"] == 3, start
        assert 0 <= finite(val["mean_dice"], start) <= 1
    md = (out / "decoder_diagnosis.md").read_text()
    assert "## Findings" in md and "(c) mean loss" in md
    assert "| encoder-only start |" in md  # both tables
    assert any(v in md for v in ("flat compared with the encoder-only start", "than the encoder-only start by 2x"))
    assert "## (E1) Decoder stages at iteration 0" in md and "clip bites" in md

    # (E1) the zeroed convolution makes decoder stage 1 put out its last norm's bias (through the LeakyReLU)
    # at every location: what the statistics must say, read off the checkpoint
    ckpt = torch.load(flat_decoder_checkpoint, weights_only=True)["network_weights"]
    last_block = max(int(k.split(".")[4]) for k in ckpt if k.startswith("decoder.stages.1.convs."))
    bias = ckpt[f"decoder.stages.1.convs.{last_block}.norm.bias"].double()
    e1 = saved["stage_statistics"]
    assert set(e1) == {"pretrained", "encoder"}
    n_dec = len(networks.build_network(networks.load_setup(str(tiny_dataset["preprocessed"])), 0).decoder.stages)
    assert list(e1["pretrained"]) == [f"decoder.stages.{j}" for j in range(n_dec)]
    flat_stage = e1["pretrained"]["decoder.stages.1"]
    assert flat_stage["location_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert flat_stage["fraction_negative_pre_activation"]["last"] == pytest.approx(float((bias < 0).double().mean()))
    leaky = torch.nn.functional.leaky_relu(bias, 0.01)
    assert flat_stage["mean_abs_output"] == pytest.approx(float(leaky.abs().mean()), rel=1e-5)
    assert flat_stage["seg_logit_std"] == pytest.approx(0.0, abs=1e-6)
    # the zeroed convolution puts out its bias alone: no spread before its norm; nnU-Net's fresh filters do spread
    assert flat_stage["pre_norm_spread"]["blocks"][-1] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 0.05 for s in e1["encoder"]["decoder.stages.1"]["pre_norm_spread"]["blocks"])
    assert e1["encoder"]["decoder.stages.1"]["location_cosine"] < 0.999  # nnU-Net's init: locations differ
    # nnU-Net initialises norms to 1 / 0; the checkpoint's perturbed ones are 0.05 * |N(0, 1)| off on average
    assert e1["encoder"]["decoder.stages.0"]["norm_mean_abs_weight_minus_1"] == 0
    assert e1["pretrained"]["decoder.stages.0"]["norm_mean_abs_weight_minus_1"] > 0.01


def test_splits_from_fewlabel_workdir_and_cli(tiny_dataset, flat_decoder_checkpoint, tmp_path):
    from nnunetv2_macl.fewlabel.splits import make_splits, write_splits

    cases = _cases(tiny_dataset)
    plan = make_splits(cases, [2, 3], 1, n_val=3, seed=4)
    work = tmp_path / "fewlabel"
    write_splits(work / "views" / "finetune" / tiny_dataset["name"], plan)
    train, val = data.cases_from_fewlabel(str(work), budget=2, fold=0)
    row = next(r for r in plan["index"] if r["budget"] == 2 and r["fold"] == 0)
    assert (train, val) == (row["train"], row["val"])
    with pytest.raises(ValueError, match="budget 5"):
        data.cases_from_fewlabel(str(work), budget=5, fold=0)

    listed = tmp_path / "val.txt"
    listed.write_text("\n".join(val) + "\n")
    assert data.parse_case_list(str(listed)) == val and data.parse_case_list("a, b,c") == ["a", "b", "c"]

    out = tmp_path / "cli"
    rc = cli.main(["--checkpoint", str(flat_decoder_checkpoint), "--preprocessed", str(tiny_dataset["preprocessed"]),
                  "--fewlabel-workdir", str(work), "--budget", "2", "--fold", "0", "--parts", "c",
                  "--finetune-iters", "3", "--finetune-batch", "2", "--no-finetune-eval", "--no-plot",
                  "--starts", "encoder,stage0_only", "--no-augment", "--out", str(out)])
    assert rc == 0
    saved = json.loads((out / "decoder_diagnosis.json").read_text())
    assert saved["train_cases"] == train and saved["val_cases"] == val
    assert "variance" not in saved and "stage_statistics" not in saved
    assert list(saved["finetune"]) == ["encoder", "stage0_only"] and len(saved["finetune"]["encoder"]["loss"]) == 3
    assert saved["finetune"]["encoder"]["augmentation"] is None and "augmentation-free" in saved["finetune_settings"]
    assert cli.main(["--checkpoint", "x", "--preprocessed", "y", "--train-cases", "a", "--val-cases", "b",
                     "--out", str(tmp_path / "bad"), "--starts", "nonsense"]) == 2


# ------------------------------------------------------------------------------ starts of part (c) / E2
def _weights(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_norms_reset_start_is_the_hand_over_with_decoder_norms_at_one_and_zero(tiny_dataset, flat_decoder_checkpoint):
    setup = networks.load_setup(str(tiny_dataset["preprocessed"]))
    ckpt = networks.load_checkpoint_dict(str(flat_decoder_checkpoint))
    hand_over = _weights(networks.build_start(setup, ckpt, "pretrained", 4)[0])
    net, report = networks.build_start(setup, ckpt, "pretrained_norms_reset", 4)
    norms = networks.decoder_instance_norms(net)
    assert norms and any("decoder.stages.0" in n for n in norms)
    reset = {id(t) for m in norms.values() for t in (m.weight, m.bias)}  # a tensor may have several keys
    changed = 0
    for k, t in net.state_dict(keep_vars=True).items():
        v = t.detach()
        if id(t) in reset:
            assert torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)), k
            changed += not torch.equal(v, hand_over[k])
        else:  # everything else, the encoder's norms (also under decoder.encoder.*) included, is the hand-over
            assert torch.equal(v, hand_over[k]), k
    assert changed > 0  # the checkpoint's norms were not at 1 / 0: the reset did something
    assert any("reset" in n for n in report.notes)


def test_stage0_only_hands_over_exactly_decoder_stage_0(tiny_dataset, flat_decoder_checkpoint):
    setup = networks.load_setup(str(tiny_dataset["preprocessed"]))
    ckpt = networks.load_checkpoint_dict(str(flat_decoder_checkpoint))
    hand_over = _weights(networks.build_start(setup, ckpt, "pretrained", 4)[0])
    encoder_only = _weights(networks.build_start(setup, ckpt, "encoder", 4)[0])
    net, report = networks.build_start(setup, ckpt, "stage0_only", 4)
    assert networks.loaded_decoder_stages(report) == [0]
    for k, v in _weights(net).items():
        stage0 = k.startswith(("decoder.stages.0.", "decoder.transpconvs.0."))
        reference = hand_over if stage0 or k.startswith(("encoder.", "decoder.encoder.")) else encoder_only
        assert torch.equal(v, reference[k]), k
    # decoder stage 0 is the checkpoint's, stage 1 is not (the two starts differ there)
    assert not torch.equal(hand_over["decoder.stages.0.convs.0.conv.weight"], encoder_only["decoder.stages.0.convs.0.conv.weight"])
    assert not torch.equal(_weights(net)["decoder.stages.1.convs.0.conv.weight"], hand_over["decoder.stages.1.convs.0.conv.weight"])
    # the restriction works on a copy: the checkpoint itself still hands over both stages
    assert networks.loaded_decoder_stages(networks.build_start(setup, ckpt, "pretrained", 4)[1]) == [0, 1]
    with pytest.raises(ValueError, match="stage 0"):
        networks.build_start(setup, ckpt, "stage0_only", 4, pretrained_stages=[1])


def test_clip_fraction_counts_iterations_above_the_clip_norm():
    assert finetune.clip_fraction([1.0, 12.0, 12.5, 30.0]) == 0.5  # 12 itself is not clipped
    assert finetune.clip_fraction([0.1] * 7) == 0.0 and finetune.clip_fraction([13.0]) == 1.0
    assert math.isnan(finetune.clip_fraction([]))
    # the same rule as torch's clip_grad_norm_ at 12: the returned (pre-clip) norm says whether it scaled
    for norm in (11.0, 13.0):
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
        total = float(torch.nn.utils.clip_grad_norm_([p], finetune.CLIP_GRAD_NORM))
        assert total == pytest.approx(norm)
        assert (float(p.grad.norm()) < norm - 1e-3) == (finetune.clip_fraction([total]) == 1.0)


def test_augmented_batches_change_the_crops_and_repeat_for_every_start(tiny_dataset):
    setup = networks.load_setup(str(tiny_dataset["preprocessed"]))
    cases = [data.read_case(setup.data_folder, c) for c in _cases(tiny_dataset)[:3]]
    _, scales = finetune.nnunet_loss(setup)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = finetune.FinetuneBatches(setup, cases, 3, 8, seed=2, scales=scales, augment=True)
    again = finetune.FinetuneBatches(setup, cases, 3, 8, seed=2, scales=scales, augment=True)  # another start
    plain = finetune.FinetuneBatches(setup, cases, 3, 8, seed=2, scales=scales, augment=False)
    assert first.crop_size != setup.patch_size  # nnU-Net's loader crops larger, for the rotations
    for it in range(3):
        images, targets, labels = first.batch(it)
        images2, targets2, labels2 = again.batch(it)
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
        assert all(torch.equal(a, b) for a, b in zip(targets, targets2))
        assert images.shape == (8, 1, *setup.patch_size) and labels.shape == (8, *setup.patch_size)
        ref_images, ref_targets, _ = plain.batch(it)
        assert [t.shape for t in targets] == [t.shape for t in ref_targets]  # the deep-supervision scales
        assert torch.equal(targets[0][:, 0].long(), labels)
        assert int(labels.min()) >= 0 and int(labels.max()) < setup.num_classes  # the -1 padding is background
    # the transforms change the crops: compare with the same crops' centres, untransformed
    images, _, _ = first.batch(0)
    raw, _ = finetune.crop_batch(first.cases, first.draws[0], first.crop_size, label_pad=-1)
    oy, ox = [(c - p) // 2 for c, p in zip(first.crop_size, setup.patch_size)]
    centre = raw[:, :, oy:oy + setup.patch_size[0], ox:ox + setup.patch_size[1]]
    changed = [not torch.allclose(images[b], centre[b], atol=1e-4) for b in range(8)]
    assert any(changed)
    assert not torch.equal(first.batch(0)[0], first.batch(1)[0])  # another iteration, other draws
    # the global generators are left as they were
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


# ------------------------------------------------------------------------------------ E1 stage statistics
def test_stage_statistics_on_hand_built_stages(tiny_dataset):
    setup = networks.load_setup(str(tiny_dataset["preprocessed"]))
    net = networks.build_network(setup, 6).eval()
    n_dec = len(net.decoder.stages)
    assert n_dec >= 3
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in networks.decoder_instance_norms(net).items():
            m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
        # stage 1: the last convolution puts out zeros, so the stage puts out LeakyReLU(its norm's bias) everywhere
        block = networks.conv_blocks(net.decoder.stages[1])[-1]
        block.conv.weight.zero_()
        block.conv.bias.zero_()
        bias = torch.linspace(-1.0, 2.0, block.norm.bias.numel())
        block.norm.bias.copy_(bias)
        # stage 2: the transposed convolution feeding it puts out zeros, so only the skip half of its input is left
        net.decoder.transpconvs[2].weight.zero_()
        net.decoder.transpconvs[2].bias.zero_()
    # slices smaller than the canvas: the padding must not count
    canvas = [2 * p for p in setup.patch_size]
    shape = tuple(setup.patch_size)
    images = data.pad_to(torch.randn(5, 1, *shape, generator=g), canvas)
    stats = stage_stats.StageStatistics(net, range(n_dec))
    stats.add(images, shape, chunk=2)
    r = stats.result()
    assert r["decoder.stages.0"]["norm_mean_abs_weight_minus_1"] > 0.1
    s1, s2 = r["decoder.stages.1"], r["decoder.stages.2"]
    assert s1["location_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert s1["fraction_negative_pre_activation"]["last"] == pytest.approx(float((bias < 0).float().mean()))
    assert s1["mean_abs_output"] == pytest.approx(float(torch.nn.functional.leaky_relu(bias, 0.01).abs().mean()), rel=1e-5)
    assert s1["seg_logit_std"] == pytest.approx(0.0, abs=1e-6)
    last_norm = list(s1["norms"])[-1]
    assert s1["norms"][last_norm]["mean_abs_bias"] == pytest.approx(float(bias.abs().mean()), rel=1e-6)
    assert s2["input_halves"]["upsampled_rms"] == 0 and s2["input_halves"]["upsampled_to_skip"] == 0
    assert s2["input_halves"]["skip_rms"] > 0
    assert r["decoder.stages.0"]["num_slices"] == 5
    # mean |x| of a stage on the content cells, computed directly from the network's stage outputs
    with torch.no_grad():
        feats = networks.forward_stages(net, images, n_dec)
    out0 = feats["decoder.stages.0"]
    h, w = variance.content_cells(shape, canvas, out0.shape[-2:])
    assert h < out0.shape[-2] and w < out0.shape[-1]
    assert r["decoder.stages.0"]["mean_abs_output"] == pytest.approx(float(out0[..., :h, :w].abs().mean()), rel=1e-5)
    assert r["decoder.stages.0"]["mean_abs_output"] != pytest.approx(float(out0.abs().mean()), rel=1e-3)
    # the hooks are gone and the forward pass is the network's own
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # resetting the norms brings them to nnU-Net's 1 / 0
    networks.reset_decoder_norms(net)
    again = stage_stats.StageStatistics(net, range(n_dec))
    again.add(images, shape)
    for stage, s in again.result().items():
        assert s["norm_mean_abs_weight_minus_1"] == 0 and s["norm_mean_abs_bias"] == 0, stage


def test_parts_accept_the_experiment_names():
    assert run.parse_parts("E1,e2, E3,e4") == ["e1", "c", "b", "a"]
    assert run.parse_parts("a,c") == ["a", "c"]
    with pytest.raises(ValueError):
        run.parse_parts("a,x")
