"""The ``macl_demo`` pair of trainers: MACL fine-tuning and its scratch counterpart, same schedule.

``nnUNetTrainerMACL_demo`` (weights from the MACL pretraining, see ``nnUNetTrainerMACL``) and
``nnUNetTrainerScratch_demo`` (nnU-Net's own trainer, random initialisation) differ in nothing but
the initial weights: both take their schedule from :func:`demo_schedule`, i.e. the same number of
epochs, training iterations and validation iterations per epoch (nnU-Net's defaults, 1000 x 250 / 50,
are far too long for a CPU demo). Found by stock ``nnUNetv2_train`` through ``nnUNet_extTrainer``
(``macl_trainer_path``), like the other trainers of this folder::

    nnUNetv2_train 990 2d 0 -tr nnUNetTrainerMACL_demo -device cpu
    nnUNetv2_train 990 2d 0 -tr nnUNetTrainerScratch_demo -device cpu

The schedule can be changed for both at once with environment variables (``macl_demo`` and its test
use them; the values are written to the training log): ``MACL_DEMO_EPOCHS`` (default 8),
``MACL_DEMO_TRAIN_ITERS`` (training iterations per epoch, default 10) and ``MACL_DEMO_VAL_ITERS``
(validation iterations per epoch, default 3).

nnU-Net imports this file by path as a top-level module and returns the first attribute of that
name it meets, so only the two demo classes are public names here (the base classes are reached
through underscore-prefixed module aliases, so that a lookup of ``nnUNetTrainerMACL`` itself never
resolves to this module).
"""
from __future__ import annotations

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as _nnunet_trainer_module
import nnunetv2_macl.trainers.nnUNetTrainerMACL as _macl_trainer_module
from nnunetv2_macl.trainers.env_schedule import EnvScheduleMixin as _EnvScheduleMixin

DEMO_EPOCHS_ENV = "MACL_DEMO_EPOCHS"
DEMO_TRAIN_ITERS_ENV = "MACL_DEMO_TRAIN_ITERS"
DEMO_VAL_ITERS_ENV = "MACL_DEMO_VAL_ITERS"
DEFAULT_DEMO_SCHEDULE = {DEMO_EPOCHS_ENV: 8, DEMO_TRAIN_ITERS_ENV: 10, DEMO_VAL_ITERS_ENV: 3}


class _DemoSchedule(_EnvScheduleMixin):
    schedule_env = DEFAULT_DEMO_SCHEDULE
    schedule_label = "macl_demo schedule"
    pair_names = "nnUNetTrainerMACL_demo and nnUNetTrainerScratch_demo"


def demo_schedule() -> tuple[int, int, int]:
    """``(epochs, train iterations per epoch, val iterations per epoch)`` of both demo trainers."""
    return _DemoSchedule.schedule()


class nnUNetTrainerMACL_demo(_DemoSchedule, _macl_trainer_module.nnUNetTrainerMACL):
    """MACL fine-tuning with the demo schedule (see module doc)."""


class nnUNetTrainerScratch_demo(_DemoSchedule, _nnunet_trainer_module.nnUNetTrainer):
    """Scratch counterpart of :class:`nnUNetTrainerMACL_demo`: same schedule, random initialisation."""
