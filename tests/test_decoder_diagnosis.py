"""pretrain/decoder_diagnosis.py: the measures on tensors with known answers, then the whole script on the
tiny synthetic dataset with a checkpoint whose last pretrained decoder stage is made spatially constant."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_macl.training.checkpoint import save_checkpoint_atomic

_SCRIPT = Path(__file__).parents[1] / "pretrain" / "decoder_diagnosis.py"
_spec = importlib.util.spec_from_file_location("decoder_diagnosis", _SCRIPT)
dd = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = dd  # dataclasses look their module up while the script loads
_spec.loader.exec_module(dd)


# ------------------------------------------------------------------------------------- (a) decomposition
def test_decomposition_sums_to_total_variance_with_unequal_slices():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(5, 4 + i % 3, 6, generator=g) * (1 + i) + i for i in range(7)]
    d = dd.variance_decomposition(maps)
    values = np.concatenate([m.flatten(1).double().numpy() for m in maps], axis=1)  # (C, all cells)
    np.testing.assert_allclose(d["spatial"] + d["across"], values.var(1), rtol=1e-10)
    np.testing.assert_allclose(d["total"], values.var(1), rtol=1e-10)
    # equal sizes: spatial is the plain mean of the per-slice variances, across the variance of the means
    same = [m[:, :4, :6] for m in maps]
    e = dd.variance_decomposition(same)
    stack = torch.stack(same).double().flatten(2)
    np.testing.assert_allclose(e["spatial"], stack.var(-1, unbiased=False).mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(e["across"], stack.mean(-1).var(0, unbiased=False).numpy(), rtol=1e-10)


def test_spatially_constant_map_has_spatial_fraction_zero_and_position_share_one():
    positions = np.arange(1, 11) / 10  # one slice per position bin
    # each channel constant over the slice, a different function of the position per channel
    maps = [torch.stack([torch.full((8, 8), float(p)), torch.full((8, 8), float(p) ** 2)]) for p in positions]
    d = dd.variance_decomposition(maps, positions)
    assert d["spatial_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert d["position_share"] == pytest.approx(1.0)
    assert d["dead_channels"] == 0
    # the same spatial pattern on every slice: all variance is spatial
    pattern = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert dd.variance_decomposition([pattern.clone() for _ in range(6)])["spatial_fraction"] == pytest.approx(1.0)
    # a channel constant everywhere is dead and left out of the averages
    flat = dd.variance_decomposition([torch.ones(2, 4, 4) for _ in range(3)])
    assert flat["dead_channels"] == 2 and math.isnan(flat["spatial_fraction"])


def test_content_cells_follow_nnunet_cell_centres():
    # stride 4 on a 32-pixel canvas: cells centred on pixels 0, 4, ..., 28; an image of 9 pixels covers 0..8
    assert dd.content_cells((9, 32), (32, 32), (8, 8)) == (3, 8)
    assert dd.content_cells((1, 1), (32, 32), (2, 2)) == (1, 1)


# ------------------------------------------------------------------------------------------- (b) probe
def test_upsampled_cell_j_sits_on_pixel_stride_times_j():
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    up = dd.upsample_logits(logits, (16, 20))
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
        probe = dd.train_linear_probe(feats[:16], train, 3, iters=150, lr=5e-2, batch_size=8, seed=0)
        acc = dd.DiceAccumulator(3)
        for i in range(len(val)):
            pred = dd.probe_predict(probe, feats[16 + i:17 + i], (32, 32))[0, :, :-3]
            acc.add_volume(str(i), pred.numpy(), val[i, :, :-3].numpy())
        scores[name] = acc.result()["mean_dice"]
    assert scores["onehot"] > 0.98, scores
    assert scores["constant"] < 0.5, scores


def test_dice_accumulator_per_volume_and_global():
    acc = dd.DiceAccumulator(3)
    ref = np.array([[1, 1, 0, 0], [2, 0, 0, 0]])
    acc.add_volume("a", ref, ref)  # perfect
    acc.add_volume("b", np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), np.array([[1, 1, 0, 0], [0, 0, 0, 0]]))
    r = acc.result()
    assert r["per_class"]["1"]["dice_per_volume_mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["per_class"]["1"]["dice_global"] == pytest.approx(2 * 3 / (3 + 4))
    # class 2 is absent from volume b's reference and prediction: only volume a counts
    assert r["per_class"]["2"]["dice_per_volume_mean"] == pytest.approx(1.0)


def test_probe_batches_oversample_foreground_like_nnunet():
    forced = dd.draw_foreground_forced(32)
    assert sum(forced) == 32 - round(32 * (1 - 0.33)) and forced[-1] and not forced[0]
    rng = np.random.default_rng(0)
    with_class = {1: np.array([7]), 2: np.array([9])}
    idx = dd.draw_probe_slices(rng, 32, 50, with_class)
    assert set(idx[np.array(forced)]) <= {7, 9}


def test_windows_and_background_phase():
    assert dd.windows(list(range(25))) == [4.5, 14.5, 22.0]
    fg = [0.4, 0.2, 0.0, 0.0, 0.01, 0.03, 0.05]
    assert dd.leaves_background_phase(fg, 0.03) == 5
    assert dd.leaves_background_phase(fg[:5], 0.03) is None  # still background-only at the end
    assert dd.leaves_background_phase([0.5, 0.4], 0.03) is None  # never entered it


# ------------------------------------------------------------------------------- script on the tiny data
@pytest.fixture(scope="module")
def flat_decoder_checkpoint(tiny_dataset, tmp_path_factory):
    """A checkpoint in the macl_pretrain format: every tensor perturbed, and the last convolution of
    decoder stage 2 zeroed, so that stage's output is one constant per channel (spatially and across slices)."""
    setup = dd.load_setup(str(tiny_dataset["preprocessed"]))
    net = dd.build_network(setup, seed=99)
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
    net = dd.build_network(dd.load_setup(str(tiny_dataset["preprocessed"])), seed=0)
    groups = dd.parameter_groups(net)
    n_enc, n_dec = len(net.encoder.stages), len(net.decoder.stages)
    assert list(groups) == [f"encoder.stages.{i}" for i in range(n_enc)] + \
        [f"decoder.stages.{j}" for j in range(n_dec)] + ["seg_layers"]
    counted = sum(p.numel() for ps in groups.values() for p in ps)
    assert counted == sum(p.numel() for p in net.parameters())


def test_same_seed_gives_identical_random_init(tiny_dataset):
    setup = dd.load_setup(str(tiny_dataset["preprocessed"]))
    a, b = dd.build_network(setup, 3), dd.build_network(setup, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pre_norm_features_are_the_last_convolution_before_norm_and_nonlinearity(tiny_dataset):
    """The pre-norm map of a stage, passed through its last block's norm and nonlinearity, is the stage output
    (so it is that convolution's output, and the hooks leave the forward pass as it was)."""
    setup = dd.load_setup(str(tiny_dataset["preprocessed"]))
    net = dd.build_network(setup, 3).eval()
    x = torch.randn(3, 1, *setup.patch_size)
    feats = dd.slice_features(net, x, 2, chunk=2, pre_norm=True)
    plain = dd.slice_features(net, x, 2, chunk=2)
    assert set(plain) < set(feats)
    for s, out in plain.items():
        assert torch.equal(out, feats[s]), s
        stage = net.encoder.stages[int(s.split(".")[-1])] if s.startswith("encoder") else \
            net.decoder.stages[int(s.split(".")[-1])]
        block = [m for m in stage.modules() if hasattr(m, "conv") and hasattr(m, "norm")][-1]
        with torch.no_grad():
            again = block.nonlin(block.norm(feats[s + dd.PRE_NORM].clone()))
        assert torch.allclose(again, out, atol=1e-5), s
        assert not torch.allclose(feats[s + dd.PRE_NORM], out, atol=1e-3), s


def test_poly_lr_is_nnunets_per_epoch_decay():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = PolyLRScheduler(opt, 1e-2, 40)
    for epoch in range(40):  # nnU-Net steps it at the start of every epoch with the epoch number
        sched.step(epoch)
        for it in (epoch * 25, epoch * 25 + 24):
            assert dd.poly_lr(1e-2, it, 1000, 25) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), it
    assert dd.poly_lr(1e-2, 5000, 1000, 25) == pytest.approx(1e-2 * (1 / 40) ** 0.9)  # stays at the last epoch
    assert dd.poly_lr(1e-2, 500, 0, 25) == 1e-2


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
    result = dd.run_diagnosis(str(flat_decoder_checkpoint), str(tiny_dataset["preprocessed"]), cases[:3], cases[3:6],
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
        assert s + dd.PRE_NORM in pre and s + dd.PRE_NORM in rnd and s + dd.PRE_NORM in enc
        assert pre[s + dd.PRE_NORM]["num_slices"] == 24
        assert 0 <= finite(rnd[s + dd.PRE_NORM]["spatial_fraction"], s) <= 1
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
    assert list(ft) == ["scratch", "encoder", "pretrained"]
    groups = list(ft["scratch"]["grad_norm"])
    assert "seg_layers" in groups and "decoder.stages.0" in groups and "encoder.stages.0" in groups
    for start, log in ft.items():
        # nnU-Net's poly decay over the protocol's 1,000 iterations of 25: epoch 0 at 1e-2 for 12 iterations
        assert log["lr"] == [pytest.approx(dd.poly_lr(1e-2, i, 1000, 25)) for i in range(iters)]
        assert len(log["loss"]) == iters and all(math.isfinite(v) for v in log["loss"]), start
        assert list(log["grad_norm"]) == groups
        for g in groups:
            assert len(log["grad_norm"][g]) == iters, (start, g)
            assert all(finite(v, (start, g)) >= 0 for v in log["grad_norm"][g])
        assert len(log["windows_of_10"]["loss"]) == 2 and all(finite(v, start) for v in log["windows_of_10"]["loss"])
    assert ft["scratch"]["transferred_groups"] == []
    assert not any(g.startswith("decoder") for g in ft["encoder"]["transferred_groups"])
    assert {"decoder.stages.0", "decoder.stages.1"} <= set(ft["pretrained"]["transferred_groups"])
    # identical data and init apart from the transfer: different starts, different first losses, pair by pair
    first = {start: finite(log["loss"][0], start) for start, log in ft.items()}
    assert first["scratch"] != pytest.approx(first["encoder"], rel=1e-6)
    assert first["encoder"] != pytest.approx(first["pretrained"], rel=1e-6)
    assert first["scratch"] != pytest.approx(first["pretrained"], rel=1e-6)
    assert set(saved["finetune_validation"]) == {"scratch", "encoder", "pretrained"}
    for start, val in saved["finetune_validation"].items():
        assert val["num_volumes"] == 3, start
        assert 0 <= finite(val["mean_dice"], start) <= 1
    md = (out / "decoder_diagnosis.md").read_text()
    assert "## Findings" in md and "(c) mean loss" in md
    assert "| encoder-only start |" in md  # both tables
    assert any(v in md for v in ("flat compared with the encoder-only start", "than the encoder-only start by 2x"))


def test_splits_from_fewlabel_workdir_and_cli(tiny_dataset, flat_decoder_checkpoint, tmp_path):
    from nnunetv2_macl.fewlabel.splits import make_splits, write_splits

    cases = _cases(tiny_dataset)
    plan = make_splits(cases, [2, 3], 1, n_val=3, seed=4)
    work = tmp_path / "fewlabel"
    write_splits(work / "views" / "finetune" / tiny_dataset["name"], plan)
    train, val = dd.cases_from_fewlabel(str(work), budget=2, fold=0)
    row = next(r for r in plan["index"] if r["budget"] == 2 and r["fold"] == 0)
    assert (train, val) == (row["train"], row["val"])
    with pytest.raises(ValueError, match="budget 5"):
        dd.cases_from_fewlabel(str(work), budget=5, fold=0)

    listed = tmp_path / "val.txt"
    listed.write_text("\n".join(val) + "\n")
    assert dd.parse_case_list(str(listed)) == val and dd.parse_case_list("a, b,c") == ["a", "b", "c"]

    out = tmp_path / "cli"
    rc = dd.main(["--checkpoint", str(flat_decoder_checkpoint), "--preprocessed", str(tiny_dataset["preprocessed"]),
                  "--fewlabel-workdir", str(work), "--budget", "2", "--fold", "0", "--parts", "c",
                  "--finetune-iters", "3", "--finetune-batch", "2", "--no-finetune-eval", "--no-plot",
                  "--out", str(out)])
    assert rc == 0
    saved = json.loads((out / "decoder_diagnosis.json").read_text())
    assert saved["train_cases"] == train and saved["val_cases"] == val
    assert "variance" not in saved and len(saved["finetune"]["pretrained"]["loss"]) == 3
