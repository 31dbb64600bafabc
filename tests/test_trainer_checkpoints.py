"""nnU-Net checkpoints of our trainers are written atomically (a kill mid-write keeps the previous one)."""
from __future__ import annotations

import os

import pytest
import torch

from nnunetv2_macl.trainers.checkpointing import AtomicCheckpointMixin


class _Writer:
    """Stands for nnU-Net's trainer: writes ``payload`` to the file it is given, optionally dying mid-way."""

    def __init__(self, payload: bytes, die_after: int | None = None, rank: int = 0):
        self.payload, self.die_after, self.rank, self.seen = payload, die_after, rank, []

    def save_checkpoint(self, filename: str) -> None:
        self.seen.append(filename)
        if self.rank != 0:
            return
        with open(filename, "wb") as f:
            if self.die_after is None:
                f.write(self.payload)
                return
            f.write(self.payload[:self.die_after])
        raise KeyboardInterrupt("killed while writing")


class _Trainer(AtomicCheckpointMixin, _Writer):
    pass


def test_a_write_that_dies_keeps_the_previous_checkpoint_whole(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    _Trainer(b"epoch-1-checkpoint").save_checkpoint(str(target))
    assert target.read_bytes() == b"epoch-1-checkpoint"
    trainer = _Trainer(b"epoch-2-checkpoint", die_after=5)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(target))
    assert trainer.seen[0] != str(target) and os.path.dirname(trainer.seen[0]) == str(tmp_path)  # a file beside it
    assert target.read_bytes() == b"epoch-1-checkpoint"                        # not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]  # no temporary file left
    _Trainer(b"epoch-2-checkpoint").save_checkpoint(str(target))
    assert target.read_bytes() == b"epoch-2-checkpoint"
    _Trainer(b"other rank", rank=1).save_checkpoint(str(target))               # writes nothing: nothing moves
    assert target.read_bytes() == b"epoch-2-checkpoint"


def test_the_trainers_a_run_resumes_write_atomically(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_macl.run.trainer_path import ext_trainer_value

    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(None))
    for name in ("nnUNetTrainerMACL", "nnUNetTrainerMACL_bench", "nnUNetTrainerScratch_bench",
                 "nnUNetTrainerMACL_protect_encoder_bench", "nnUNetTrainerScratch_warmup_bench"):
        cls = recursive_find_trainer_class_by_name(name)
        assert any(b.__name__ == "AtomicCheckpointMixin" for b in cls.__mro__), name
        # ours comes first: nnU-Net's in-place torch.save is only ever called on the temporary file
        names = [b.__name__ for b in cls.__mro__]
        assert names.index("AtomicCheckpointMixin") < names.index("nnUNetTrainer"), name


def test_a_real_trainer_checkpoint_loads_after_the_rename(tiny_dataset, trainer_env):
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(tiny_dataset["id"]), "2d", 0, "nnUNetTrainerScratch_bench",
                                    tiny_dataset["plans"], False, device=torch.device("cpu"))
    trainer.initialize()
    path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    os.makedirs(trainer.output_folder, exist_ok=True)
    trainer.save_checkpoint(path)
    names = os.listdir(trainer.output_folder)
    assert "checkpoint_latest.pth" in names and not any(n.startswith(".tmp_") for n in names)
    again = get_trainer_from_args(str(tiny_dataset["id"]), "2d", 0, "nnUNetTrainerScratch_bench",
                                  tiny_dataset["plans"], False, device=torch.device("cpu"))
    again.load_checkpoint(path)
    assert again.current_epoch == trainer.current_epoch + 1
