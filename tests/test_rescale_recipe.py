"""The rescale fine-tuning recipe (issue 29): at training start the pretrained convolutions that an InstanceNorm
follows are rescaled, filter by filter, to the output spread of nnU-Net's initialisation on a training batch (same
function, nnU-Net's gradient scale), then nnU-Net's stock optimiser."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnunetv2_macl.errors import FewLabelError
from nnunetv2_macl.fewlabel.settings import parse_arm
from nnunetv2_macl.transfer import transfer_pretrained_weights
from nnunetv2_macl.transfer.calibrate import (MIN_CALIBRATION_IMAGES, calibrate_to_reference,
                                              draw_calibration_batches, normalised_convolutions)

from test_transfer import _arch, _trainer, build_network, macl_checkpoint, pretrained_for_trainers


def test_rescale_arms():
    """The few-label arms of the recipe (the trainers' names, starts and recipes: test_trainer_names.py)."""
    assert parse_arm("macl:rescale").trainer == "nnUNetTrainerMACL_rescale_bench"
    assert parse_arm("macl:rescale@encoder").trainer == "nnUNetTrainerMACL_rescale_encoder_bench"
    assert parse_arm("macl:rescale@encoder").key == "macl_rescale_encoder"
    with pytest.raises(FewLabelError, match="rescale recipe rescales the pretrained filters"):
        parse_arm("scratch:rescale")
    from nnunetv2_macl.run.fewlabel import DEFAULTS, build_parser, settings_from_args

    args = build_parser().parse_args(["-d", "1", "--recipe", "rescale", "--methods", "scratch,macl"])
    arms = settings_from_args(args, dict(DEFAULTS)).arms()  # every recipe is a --recipe choice
    assert [a.trainer for a in arms] == ["nnUNetTrainerScratch_bench", "nnUNetTrainerMACL_rescale_bench"]


def test_the_report_names_each_recipe():
    """The caption describes every recipe of the table (rescale was described as warm-up before)."""
    from nnunetv2_macl.fewlabel.report import _recipe_text
    from nnunetv2_macl.fewlabel.settings import Settings
    from nnunetv2_macl.trainers.schedules import RECIPES

    s = Settings(methods=("scratch", "macl:rescale"), finetune_epochs=40)
    texts = {r: _recipe_text(r, s) for r in RECIPES}
    assert all(text.startswith(f"{r} = ") for r, text in texts.items())
    assert "output spread of nnU-Net's initialisation" in texts["rescale"] and "warm-up" not in texts["rescale"]


@pytest.mark.parametrize("batch_size, drawn", [(32, 1), (16, 1), (12, 2), (2, 8), (1, 8)])
def test_calibration_draws_enough_images(batch_size, drawn):
    """A 2-D plan's batch is enough; a 3-D plan's batch of 2 is topped up to 16 images, never past 8 batches."""
    calls = []

    def next_batch():
        calls.append(1)
        return torch.zeros(batch_size, 1, 4, 4)

    batches = draw_calibration_batches(next_batch)
    assert len(batches) == len(calls) == drawn
    assert sum(len(b) for b in batches) >= min(MIN_CALIBRATION_IMAGES, 8 * batch_size)


def _spread_before_norm(network, key, x):
    conv = dict(network.named_modules())[key[: -len(".weight")]]
    seen = {}

    def hook(_module, _inputs, output):  # returns None: the output stays as it is
        seen["s"] = output.flatten(2).std(dim=2).pow(2).mean(0).sqrt()

    handle = conv.register_forward_hook(hook)
    with torch.no_grad():
        network.eval()(x)
    handle.remove()
    return seen["s"]


def test_calibration_keeps_the_function_and_restores_the_gradient(tiny_dataset):
    """After ``calibrate_to_reference`` each calibrated filter puts out the reference layer's mean spread on the
    batch, the network's outputs are unchanged, a filter scaled by c gets 1/c of its gradient, and what is not a
    normalised convolution (transposed convolutions, norms) is untouched."""
    plans_file = tiny_dataset["plans_file"]
    ckpt = macl_checkpoint(build_network(plans_file, seed=0), plans_file, decoder_blocks=2)  # filters far above init
    reference, plain, calibrated = (build_network(plans_file, seed=1) for _ in range(3))
    transfer_pretrained_weights(plain, ckpt, log=None, scope="pretrained")
    report = transfer_pretrained_weights(calibrated, ckpt, log=None, scope="pretrained")
    _, cm = _arch(plans_file)
    x = torch.randn(4, 1, *cm.patch_size, generator=torch.Generator().manual_seed(0))
    result = calibrate_to_reference(calibrated, reference, x, report.loaded)
    convs = normalised_convolutions(calibrated)
    key = "decoder.stages.0.convs.0.conv.weight"
    assert key in result.layers and not any("transpconvs" in k for k in result.layers)
    assert set(result.layers) == {k for k in report.loaded if k in convs}
    assert "rescaled to the output spread of nnU-Net's initialisation on 4 training images" in result.summary()
    # the same images in two batches: the same spreads, so the same filters (the trainer draws >= 16 images)
    in_two = build_network(plans_file, seed=1)
    transfer_pretrained_weights(in_two, ckpt, log=None, scope="pretrained")
    calibrate_to_reference(in_two, reference, [x[:1], x[1:]], report.loaded)
    for k, v in calibrated.state_dict().items():
        torch.testing.assert_close(in_two.state_dict()[k], v, rtol=1e-5, atol=1e-7)
    for k in result.layers:
        goal = _spread_before_norm(reference, k, x).mean()
        torch.testing.assert_close(_spread_before_norm(calibrated, k, x), goal.expand(dict(
            calibrated.named_parameters())[k].shape[0]), rtol=1e-3, atol=1e-5)
        before, after, ref = result.layers[k]
        assert after == pytest.approx(ref, rel=1e-3) and before > 2 * ref  # the checkpoint's filters spread wider
    plain_sd, cal_sd = plain.state_dict(), calibrated.state_dict()
    for k, _ in plain.named_parameters():  # one name per tensor
        if k not in convs and convs.get(k[: -len("bias")] + "weight") is None:
            assert torch.equal(plain_sd[k], cal_sd[k]), k
    plain.eval(), calibrated.eval()
    out_plain, out_cal = plain(x), calibrated(x)
    for a, b in zip(out_plain, out_cal):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    sum(o.square().mean() for o in out_plain).backward()
    sum(o.square().mean() for o in out_cal).backward()
    # same function, so a filter scaled by c gets 1/c of the gradient: relative to its size it moves 1/c^2 as fast
    for k in ("encoder.stages.0.0.convs.0.conv.weight", key):
        w_plain, w_cal = dict(plain.named_parameters())[k], dict(calibrated.named_parameters())[k]
        c = w_cal.detach().flatten(1).norm(dim=1) / w_plain.detach().flatten(1).norm(dim=1)
        assert (c < 1).all() and c.mean() < 0.7  # the checkpoint's filters spread wider than the initial ones
        torch.testing.assert_close(w_cal.grad.flatten(1).norm(dim=1) * c, w_plain.grad.flatten(1).norm(dim=1),
                                   rtol=2e-2, atol=1e-7)


@pytest.mark.parametrize("trainer_name, decoder_rescaled", [("nnUNetTrainerMACL_paperTransfer_rescale", True),
                                                            ("nnUNetTrainerMACL_rescale", False)])
def test_the_trainer_calibrates_what_it_handed_over(tiny_dataset, trainer_env, monkeypatch, trainer_name,
                                                    decoder_rescaled):
    """nnU-Net's trainer with the rescale recipe: at training start the loaded normalised convolutions (the
    decoder stages only in the hand-over) are rescaled filter by filter (positive factors), nothing else moves,
    the optimiser is nnU-Net's own and the log says so."""
    ckpt = pretrained_for_trainers(tiny_dataset, trainer_env, monkeypatch)
    trainer = _trainer(tiny_dataset["id"], tiny_dataset["plans"], trainer_name)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 1, 1
    trainer.on_train_start()
    try:
        sd = trainer.network.state_dict()
        report = trainer.macl_transfer_report
        convs = normalised_convolutions(trainer.network)
        scaled = {"encoder": 0, "decoder": 0}
        for k in report.loaded:
            w = ckpt["network_weights"][k]
            if k in convs:
                factor = sd[k].flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)
                torch.testing.assert_close(sd[k], w * factor.view(-1, *([1] * (w.ndim - 1))))
                assert (factor > 0).all() and not torch.allclose(factor, torch.ones_like(factor))
                scaled["decoder" if k.startswith("decoder.stages.") else "encoder"] += 1
            elif convs.get(k[: -len("bias")] + "weight") is None:
                assert torch.equal(sd[k], w), k
        assert scaled["encoder"] > 0 and (scaled["decoder"] > 0) == decoder_rescaled
        assert type(trainer.optimizer).__name__ == "SGD" and len(trainer.optimizer.param_groups) == 1
        log = "".join(p.read_text() for p in Path(trainer.output_folder).glob("training_log_*.txt"))
        assert "fine-tuning recipe: rescale" in log and "pretrained convolutions rescaled to the output spread" in log
    finally:
        trainer.on_train_end()
