"""Pretraining length: ``--keep-epochs`` snapshots and honest extension of a run to more ``--epochs``.

A snapshot at epoch E of a longer run must hold exactly the weights of that run stopped after E
epochs (same schedule), be loadable ``weights_only`` and say which schedule it came from. Resuming
with a larger ``--epochs`` must never raise the learning rate, and must refuse a finished run (its
learning rate has decayed to 0). Tiny data, CPU, seconds per run (``tests/test_resume.py``'s dataset).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_macl.errors import ConfigError
from nnunetv2_macl.run.pretrain import build_parser, config_from_args, main
from nnunetv2_macl.training.checkpoint import load_checkpoint
from nnunetv2_macl.training.lr_schedule import CosineSchedule
from nnunetv2_macl.training.pretrainer import MACLPretrainer, kept_checkpoint_name
from test_resume import _all_weights, common_args, make_small_dataset


class RunStopped(Exception):
    """Raised to cut a run after a given number of epochs, as a kill would."""


def stop_after(monkeypatch, epochs: int) -> None:
    """Make the next run raise :class:`RunStopped` once ``epochs`` epochs are done (checkpoints written)."""
    original = MACLPretrainer.on_epoch_end

    def on_epoch_end(self, sums, n):
        original(self, sums, n)
        if self.current_epoch >= epochs:
            raise RunStopped

    monkeypatch.setattr(MACLPretrainer, "on_epoch_end", on_epoch_end)


def test_keep_epochs_option_parses_and_is_checked():
    args = build_parser().parse_args(["-d", "1", "--epochs", "32", "--keep-epochs", "16,8,32,8"])
    assert config_from_args(args).keep_epochs == (8, 16, 32)
    from nnunetv2_macl.training.config import MACLConfig, validate

    with pytest.raises(ConfigError, match="--keep-epochs"):
        validate(MACLConfig(epochs=10, keep_epochs=(8, 16)))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-d", "1", "--keep-epochs", "eight"])


def test_schedule_extension_continues_from_the_rate_reached():
    s = CosineSchedule.single(100)
    e = s.extended(40, 250)
    assert e(40) == pytest.approx(s(40)) and e(39) == pytest.approx(s(39))
    factors = [e(i) for i in range(0, 251)]
    assert all(b <= a + 1e-12 for a, b in zip(factors, factors[1:]))  # never rises
    assert e(250) == pytest.approx(0.0, abs=1e-12) and e(145) == pytest.approx(s(40) / 2)
    assert CosineSchedule.from_list(e.to_list()).to_list() == e.to_list()
    with pytest.raises(ConfigError, match="decayed"):
        s.extended(100, 200)
    with pytest.raises(ConfigError, match="larger --epochs"):
        s.extended(40, 30)
    assert s.extended(40, 100) is s


def test_keep_epochs_snapshots_equal_a_run_stopped_there(nnunet_env, tiny_dataset, monkeypatch):
    whole = make_small_dataset(nnunet_env, tiny_dataset, 935)
    cut = make_small_dataset(nnunet_env, tiny_dataset, 936)
    assert main([*common_args(935, 3), "--keep-epochs", "1,2"]) == 0
    # the same 3-epoch run, stopped after its second epoch (checkpoint_latest is written every epoch)
    stop_after(monkeypatch, 2)
    with pytest.raises(RunStopped):
        main(common_args(936, 3))
    stopped = load_checkpoint(str(cut["output"] / "checkpoint_latest.pth"))
    assert stopped["macl"]["epoch"] == 2

    snap = torch.load(whole["output"] / kept_checkpoint_name(2), weights_only=True)
    assert snap["macl"]["epoch"] == 2 and snap["macl"]["epochs"] == 3  # a point of a 3-epoch schedule
    assert snap["macl"]["lr_schedule"] == stopped["macl"]["lr_schedule"]
    a, b = _all_weights(snap), _all_weights(stopped)
    assert a.keys() == b.keys()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()) <= 1e-5
    first = torch.load(whole["output"] / kept_checkpoint_name(1), weights_only=True)
    assert first["macl"]["epoch"] == 1
    assert any(not torch.equal(first["network_weights"][k], snap["network_weights"][k]) for k in first["network_weights"])
    assert not (whole["output"] / kept_checkpoint_name(3)).exists()  # only the listed epochs
    # the length report reads a snapshot's losses from the log row of the epoch it was kept after
    from nnunetv2_macl.fewlabel.pretraining_length import completed_epochs
    final = load_checkpoint(str(whole["output"] / "checkpoint_final.pth"))
    assert completed_epochs(snap["logging"]) == [1, 2] and completed_epochs(final["logging"]) == [1, 2, 3]
    assert final["logging"]["Ld"][completed_epochs(final["logging"]).index(2)] == snap["logging"]["Ld"][-1]


def test_extending_a_run_never_raises_the_learning_rate(nnunet_env, tiny_dataset, monkeypatch):
    ds = make_small_dataset(nnunet_env, tiny_dataset, 937)
    stop_after(monkeypatch, 2)
    with pytest.raises(RunStopped):
        main(common_args(937, 4))
    monkeypatch.undo()
    before = load_checkpoint(str(ds["output"] / "checkpoint_latest.pth"))
    lr_reached = before["logging"]["lr"][-1]
    assert main([*common_args(937, 8), "--c"]) == 0  # 4 -> 8 epochs from epoch 2
    after = load_checkpoint(str(ds["output"] / "checkpoint_final.pth"))
    assert after["macl"]["epoch"] == 8 and after["macl"]["epochs"] == 8
    lrs = after["logging"]["lr"]
    assert lrs[:2] == pytest.approx(before["logging"]["lr"])
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), lrs
    assert lrs[2] < lr_reached
    # an 8-epoch run from the start would be at a higher rate at epoch 3 than this extension
    fresh = CosineSchedule.single(8 * 2)
    assert lrs[2] < 0.1 * fresh(3 * 2)
    segments = after["macl"]["lr_schedule"]
    assert len(segments) == 2 and segments[1][0] == 2 * 2 and segments[1][1] == 8 * 2
    assert np.isclose(segments[1][2] * 0.1, lr_reached, rtol=1e-4)

    # a finished run has no learning rate left: extending it is refused, nothing is written
    mtime = (ds["output"] / "checkpoint_final.pth").stat().st_mtime_ns
    assert main([*common_args(937, 12), "--c"]) != 0
    assert (ds["output"] / "checkpoint_final.pth").stat().st_mtime_ns == mtime



def test_diagnose_reads_a_checkpoint_before_0_3_with_its_own_ler():
    """A checkpoint whose config has no ``ler_content_mask`` (written before 0.3) is diagnosed with the LER it
    was trained with, over every cell; a 0.3 checkpoint with what it stored."""
    from nnunetv2_macl.run.diagnose import config_from_meta
    from nnunetv2_macl.training.config import MACLConfig

    stored = MACLConfig(epochs=8, batch_size=16, dense_head=True).to_dict()
    assert config_from_meta({"config": stored}).ler_content_mask is True
    old = {k: v for k, v in stored.items() if k != "ler_content_mask"}
    cfg = config_from_meta({"config": old})
    assert cfg.ler_content_mask is False and cfg.dense_head is True and cfg.epochs == 8 and cfg.num_workers == 0
    assert config_from_meta({"config": {**stored, "ler_content_mask": False}}).ler_content_mask is False
