"""The protect fine-tuning recipe (issue 29 part 2): pretrained parts frozen while the new parts warm up,
then every part warmed up, then poly decay; two parameter groups that survive ``--c``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nnunetv2_macl.errors import FewLabelError
from nnunetv2_macl.fewlabel import records
from nnunetv2_macl.fewlabel.settings import Settings, parse_arm, validate
from nnunetv2_macl.fewlabel.splits import make_splits
from nnunetv2_macl.trainers.schedules import (NAMES_KEY, NEW, PRETRAINED, ROLE_KEY, ProtectLRScheduler,
                                              protect_settings, role_groups)

from test_transfer import _trainer, pretrained_for_trainers

ENCODER_KEY = "encoder.stages.0.0.convs.0.conv.weight"      # pretrained in both hand-overs
HANDED_DECODER_KEY = "decoder.stages.0.convs.0.conv.weight"  # pretrained decoder stage (N = 2)
NEW_KEY = "decoder.stages.2.convs.0.conv.weight"             # beyond the N = 2 pretrained blocks


def _env_clear(monkeypatch):
    for name in ("MACL_FT_PEAK_LR", "MACL_FT_WARMUP_EPOCHS", "MACL_FT_FREEZE_EPOCHS", "MACL_FT_PRETRAINED_LR_FACTOR"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------------ schedule
def test_protect_schedule_freezes_then_warms_everything_then_decays():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], ROLE_KEY: NEW},
              {"params": [torch.nn.Parameter(torch.zeros(1))], ROLE_KEY: PRETRAINED}]
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = ProtectLRScheduler(opt, 1e-2, num_epochs=20, freeze_epochs=3, warmup_epochs=2, pretrained_factor=0.5)
    new = [sched.lr_at(e, NEW) for e in range(20)]
    pre = [sched.lr_at(e, PRETRAINED) for e in range(20)]
    assert [sched.frozen(e) for e in range(5)] == [True, True, True, False, False]
    assert new[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2]) and pre[:3] == [0.0, 0.0, 0.0]
    assert new[3:5] == pytest.approx([5e-3, 1e-2])                          # the second warm-up: every part
    assert pre[3:5] == pytest.approx([2.5e-3, 5e-3])                        # x the pretrained factor
    assert all(a > b for a, b in zip(new[5:], new[6:])) and new[19] > 0
    assert new[10] == pytest.approx(1e-2 * (1 - 5 / 15) ** 0.9) and pre[10] == pytest.approx(0.5 * new[10])
    sched.step(4)                                                           # stateless: what --c relies on
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([new[4], pre[4]])


def test_protect_settings_defaults_and_errors(monkeypatch):
    _env_clear(monkeypatch)
    assert protect_settings(80) == (1e-2, 12, 4, 1.0)                       # 15 % frozen, 5 % warm-up, nnU-Net's lr
    monkeypatch.setenv("MACL_FT_FREEZE_EPOCHS", "0")
    monkeypatch.setenv("MACL_FT_PRETRAINED_LR_FACTOR", "0.1")
    assert protect_settings(80) == (1e-2, 0, 4, 0.1)
    monkeypatch.setenv("MACL_FT_FREEZE_EPOCHS", "78")
    with pytest.raises(ValueError, match="leave some"):
        protect_settings(80)
    monkeypatch.setenv("MACL_FT_FREEZE_EPOCHS", "-1")
    with pytest.raises(ValueError, match="MACL_FT_FREEZE_EPOCHS"):
        protect_settings(80)
    monkeypatch.setenv("MACL_FT_FREEZE_EPOCHS", "2")
    monkeypatch.setenv("MACL_FT_PRETRAINED_LR_FACTOR", "0")
    with pytest.raises(ValueError, match="MACL_FT_PRETRAINED_LR_FACTOR"):
        protect_settings(80)


def test_role_groups_split_by_name():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    groups = role_groups(net, {"0.weight", "0.bias"})
    assert [g[ROLE_KEY] for g in groups] == [NEW, PRETRAINED]
    assert groups[0][NAMES_KEY] == ["1.weight", "1.bias"] and groups[1][NAMES_KEY] == ["0.weight", "0.bias"]
    assert [g[ROLE_KEY] for g in role_groups(net, set())] == [NEW]            # nothing pretrained: one group


# ------------------------------------------------------------------------------------------------ few-label arms
def test_protect_arms_trainers_and_fingerprints():
    assert parse_arm("macl:protect").trainer == "nnUNetTrainerMACL_protect_bench"
    assert parse_arm("macl:protect@encoder").trainer == "nnUNetTrainerMACL_protect_encoder_bench"
    with pytest.raises(FewLabelError, match="scratch takes stock or warmup"):
        parse_arm("scratch:protect")
    with pytest.raises(FewLabelError, match="freeze_epochs"):
        validate(Settings(methods=("scratch", "macl:protect"), finetune_epochs=10, freeze_epochs=10))
    plain = Settings(methods=("scratch", "macl@encoder", "macl:warmup", "macl:protect"), budgets=(4,), folds=1)
    tuned = dataclasses.replace(plain, freeze_epochs=3, pretrained_lr_factor=0.5)
    cases = [f"case_{i:03d}" for i in range(40)]
    plan = make_splits(cases, plain.budgets, 1, "heldout", 5)
    before = {t.key: records.task_fingerprint(t, plain, plan, cases) for t in records.task_list(plain, plan)}
    after = {t.key: records.task_fingerprint(t, tuned, plan, cases) for t in records.task_list(tuned, plan)}
    assert sorted(k for k in before if before[k] != after[k]) == ["train:macl_protect:M4:f0"]
    assert "freeze_epochs" not in before["train:macl_warmup:M4:f0"] and "freeze_epochs" in before["train:macl_protect:M4:f0"]
    peak = dataclasses.replace(plain, warmup_peak_lr=0.02)                 # the peak shapes warm-up and protect
    moved = {t.key for t in records.task_list(peak, plan)
             if records.task_fingerprint(t, peak, plan, cases) != before[t.key]}
    assert moved == {"train:macl_warmup:M4:f0", "train:macl_protect:M4:f0"}


# ------------------------------------------------------------------------------------------------ a real training
def _protect_trainer(tiny_dataset):
    trainer = _trainer(tiny_dataset["id"], tiny_dataset["plans"], "nnUNetTrainerMACL_paperTransfer_protect")
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 4, 2, 1
    trainer.save_every = 1
    return trainer


def test_protect_training_freezes_the_handed_over_parts_then_trains_them_and_resumes(tiny_dataset, trainer_env,
                                                                                     monkeypatch):
    """nnU-Net training with the paper hand-over and the protect recipe (4 epochs x 2 iterations, 2 frozen):
    the encoder and the handed-over decoder stage stay at the checkpoint's values while the new parts move,
    then move too; ``load_checkpoint`` rebuilds the same two groups (roles, names, momentum)."""
    _env_clear(monkeypatch)
    monkeypatch.setenv("MACL_FT_FREEZE_EPOCHS", "2")
    monkeypatch.setenv("MACL_FT_WARMUP_EPOCHS", "1")
    ckpt = pretrained_for_trainers(tiny_dataset, trainer_env, monkeypatch)

    trainer = _protect_trainer(tiny_dataset)
    seen = []
    end_of_epoch = trainer.on_train_epoch_end

    def record(outputs):
        sd = trainer.network.state_dict()
        seen.append({k: sd[k].detach().clone() for k in (ENCODER_KEY, HANDED_DECODER_KEY, NEW_KEY)})
        return end_of_epoch(outputs)

    trainer.on_train_epoch_end = record
    trainer.initialize()
    new_at_init = trainer.network.state_dict()[NEW_KEY].clone()
    trainer.run_training()

    w = ckpt["network_weights"]
    assert [g[ROLE_KEY] for g in trainer.optimizer.param_groups] == [NEW, PRETRAINED]
    pretrained_names = set(trainer.optimizer.param_groups[1][NAMES_KEY])
    assert {ENCODER_KEY, HANDED_DECODER_KEY} <= pretrained_names and NEW_KEY not in pretrained_names
    for epoch in (0, 1):                                                    # frozen: exactly the checkpoint's
        assert torch.equal(seen[epoch][ENCODER_KEY], w[ENCODER_KEY])
        assert torch.equal(seen[epoch][HANDED_DECODER_KEY], w[HANDED_DECODER_KEY])
    assert not torch.equal(seen[0][NEW_KEY], new_at_init)                   # the new parts train from epoch 0
    assert not torch.equal(seen[2][ENCODER_KEY], w[ENCODER_KEY])            # unfrozen at epoch 2
    assert not torch.equal(seen[2][HANDED_DECODER_KEY], w[HANDED_DECODER_KEY])
    log = "".join(p.read_text() for p in Path(trainer.output_folder).glob("training_log_*.txt"))
    assert "fine-tuning recipe: protect" in log and "(pretrained parts frozen)" in log

    # --c: a fresh trainer (one group at initialize) takes the saved groups back
    resumed = _protect_trainer(tiny_dataset)
    resumed.initialize()
    assert len(resumed.optimizer.param_groups) == 1
    resumed.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    assert [g[ROLE_KEY] for g in resumed.optimizer.param_groups] == [NEW, PRETRAINED]
    assert set(resumed.optimizer.param_groups[1][NAMES_KEY]) == pretrained_names
    saved = trainer.optimizer.state_dict()["state"]
    restored = resumed.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and all(
        torch.equal(saved[i]["momentum_buffer"], restored[i]["momentum_buffer"]) for i in saved)
