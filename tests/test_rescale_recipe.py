"""The rescale fine-tuning recipe (issue 29): the pretrained filters that an InstanceNorm follows are brought
back to the norm of nnU-Net's initialisation at the transfer (same function, nnU-Net's effective learning rate),
then nnU-Net's stock optimiser. The transfer itself: ``test_transfer.py``."""
from __future__ import annotations

import os

import pytest
import torch

from nnunetv2_macl.errors import FewLabelError
from nnunetv2_macl.fewlabel.settings import parse_arm
from nnunetv2_macl.training.checkpoint import save_checkpoint_atomic
from nnunetv2_macl.transfer.load_pretrained import normalised_convolutions

from test_transfer import build_network, macl_checkpoint


def test_rescale_arms_and_trainers_are_found_by_nnunet(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    assert parse_arm("macl:rescale").trainer == "nnUNetTrainerMACL_rescale_bench"
    assert parse_arm("macl:rescale@encoder").trainer == "nnUNetTrainerMACL_rescale_encoder_bench"
    assert parse_arm("macl:rescale@encoder").key == "macl_rescale_encoder"
    with pytest.raises(FewLabelError, match="rescale recipe rescales the pretrained filters"):
        parse_arm("scratch:rescale")
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(None))
    expected = {"nnUNetTrainerMACL_rescale": "encoder", "nnUNetTrainerMACL_paperTransfer_rescale": "pretrained",
                "nnUNetTrainerMACL_rescale_bench": "pretrained", "nnUNetTrainerMACL_rescale_encoder_bench": "encoder"}
    for name, scope in expected.items():
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and cls.finetune_recipe == "rescale" and cls.macl_transfer_scope == scope


@pytest.mark.parametrize("trainer_name, decoder_rescaled", [("nnUNetTrainerMACL_paperTransfer_rescale", True),
                                                            ("nnUNetTrainerMACL_rescale", False)])
def test_the_trainer_hands_over_rescaled_filters(tiny_dataset, monkeypatch, tmp_path, trainer_name, decoder_rescaled):
    """nnU-Net's trainer with the rescale recipe: after the transfer every loaded normalised convolution's filters
    have the initial RMS norm (the decoder stages only in the hand-over), the rest is the checkpoint's, the
    optimiser is nnU-Net's own, and the log says which recipe ran."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(os.environ.get("nnUNet_extTrainer")))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    ckpt = macl_checkpoint(build_network(tiny_dataset["plans_file"], seed=0), tiny_dataset["plans_file"])
    path = tmp_path / "pretrained.pth"
    save_checkpoint_atomic(ckpt, str(path))
    monkeypatch.setenv("MACL_PRETRAINED", str(path))
    trainer = get_trainer_from_args(str(tiny_dataset["id"]), "2d", 0, trainer_name, tiny_dataset["plans"], False,
                                    device=torch.device("cpu"))
    trainer.initialize()
    initial = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    report = trainer.apply_macl_pretrained_weights()
    sd = trainer.network.state_dict()
    convs = normalised_convolutions(trainer.network)
    checked = {"encoder": 0, "decoder": 0}
    for k in report.loaded:
        if k in convs:
            target = initial[k].flatten(1).norm(dim=1).pow(2).mean().sqrt()
            torch.testing.assert_close(sd[k].flatten(1).norm(dim=1), target.expand(sd[k].shape[0]))
            checked["decoder" if k.startswith("decoder.stages.") else "encoder"] += 1
        elif k.endswith("norm.weight") or "transpconvs" in k:
            assert torch.equal(sd[k], ckpt["network_weights"][k]), k
    assert checked["encoder"] > 0 and (checked["decoder"] > 0) == decoder_rescaled
    assert any("rescaled to the norm of nnU-Net's initialisation" in n for n in report.notes)
    assert type(trainer.optimizer).__name__ == "SGD" and len(trainer.optimizer.param_groups) == 1
    assert "fine-tuning recipe: rescale" in trainer.recipe_description()
