"""The few-label benchmark's pair of trainers: MACL fine-tuning and scratch, identical schedule and seed.

``nnUNetTrainerMACL_bench`` (weights from a MACL/PCL/SimCLR pretraining, see ``nnUNetTrainerMACL``; the
checkpoint comes from ``MACL_PRETRAINED``) and ``nnUNetTrainerScratch_bench`` (nnU-Net's own trainer,
random initialisation) differ in nothing but the initial weights of the pretrained parts. Used by
``pretrain/fewlabel_benchmark.py`` through stock ``nnUNetv2_train`` (found via ``nnUNet_extTrainer``)::

    MACL_BENCH_EPOCHS=50 MACL_BENCH_ITERS=50 MACL_PRETRAINED=/path/checkpoint_final.pth \\
        nnUNetv2_train 504 2d 0 -tr nnUNetTrainerMACL_bench -device cuda
    MACL_BENCH_EPOCHS=50 MACL_BENCH_ITERS=50 nnUNetv2_train 504 2d 0 -tr nnUNetTrainerScratch_bench -device cuda

Schedule and seed, read from the environment when the trainer is built (both trainers read the same
variables; the values are written to the training log):

==========================  =======  ==================================================================
variable                    default  meaning
==========================  =======  ==================================================================
``MACL_BENCH_EPOCHS``       50       epochs (nnU-Net's poly learning-rate decay spans them)
``MACL_BENCH_ITERS``        50       training iterations (batches) per epoch
``MACL_BENCH_VAL_ITERS``    10       validation iterations per epoch (only nnU-Net's pseudo Dice /
                                     best-checkpoint bookkeeping; the reported Dice comes from the
                                     final full validation, which predicts every validation case)
``MACL_BENCH_SEED``         12345    seeds python's ``random``, numpy and torch (CPU and CUDA) in the
                                     trainer's process before the network is built
``MACL_BENCH_SAVE_EVERY``   50       write ``checkpoint_latest.pth`` every K epochs (nnU-Net's
                                     ``save_every``; what ``--c`` continues from)
``MACL_BENCH_BATCH``        (plans)  batch size; unset or empty = the plans' batch size (stock nnU-Net).
                                     Only for CPU-sized runs (Hippocampus 2d plans ask for 281 slices)
==========================  =======  ==================================================================

Recipes: ``nnUNetTrainerMACL_bench`` / ``nnUNetTrainerScratch_bench`` use nnU-Net's stock recipe,
``nnUNetTrainerMACL_warmup_bench`` / ``nnUNetTrainerScratch_warmup_bench`` the warm-up recipe of
:mod:`nnunetv2_macl.trainers.schedules` (``MACL_FT_PEAK_LR``, ``MACL_FT_WARMUP_EPOCHS``),
``nnUNetTrainerMACL_protect_bench`` / ``_protect_encoder_bench`` its protect recipe (pretrained parts frozen
first; ``MACL_FT_FREEZE_EPOCHS``, ``MACL_FT_PRETRAINED_LR_FACTOR`` besides the two above; no scratch
counterpart: a scratch start has nothing to protect), ``nnUNetTrainerMACL_rescale_bench`` /
``_rescale_encoder_bench`` its rescale recipe (pretrained filters at nnU-Net's initial output spread).

Seeding: stock nnU-Net trainings are not seeded. Here the training process is, so scratch and MACL runs
start from the same random initialisation of every part that is not pretrained (with the same seed the
scratch network equals the MACL network before the transfer). The runs are still not bit-for-bit
reproducible: nnU-Net's data augmentation runs in ``nnUNet_n_proc_DA`` worker processes with their own
unseeded random state, and cuDNN picks non-deterministic kernels.

nnU-Net imports this file by path as a top-level module and returns the first attribute of a
trainer's name that it meets, so only the benchmark classes are public names here (base classes
are reached through underscore-prefixed module aliases, as in ``demo_trainers.py``).
"""
from __future__ import annotations

import os
import random as _random

import numpy as _np
import torch

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as _nnunet_trainer_module
import nnunetv2_macl.trainers.nnUNetTrainerMACL as _macl_trainer_module
from nnunetv2_macl.trainers.checkpointing import AtomicCheckpointMixin as _AtomicCheckpointMixin
from nnunetv2_macl.trainers.env_schedule import EnvScheduleMixin as _EnvScheduleMixin
from nnunetv2_macl.trainers.env_schedule import int_from_env as _int_from_env
from nnunetv2_macl.trainers.schedules import FinetuneRecipeMixin as _FinetuneRecipeMixin

BENCH_EPOCHS_ENV = "MACL_BENCH_EPOCHS"
BENCH_ITERS_ENV = "MACL_BENCH_ITERS"
BENCH_VAL_ITERS_ENV = "MACL_BENCH_VAL_ITERS"
BENCH_SEED_ENV = "MACL_BENCH_SEED"
BENCH_BATCH_ENV = "MACL_BENCH_BATCH"
BENCH_SAVE_EVERY_ENV = "MACL_BENCH_SAVE_EVERY"
DEFAULT_BENCH_SCHEDULE = {BENCH_EPOCHS_ENV: 50, BENCH_ITERS_ENV: 50, BENCH_VAL_ITERS_ENV: 10}
DEFAULT_BENCH_SEED = 12345


def bench_seed() -> int:
    return _int_from_env(BENCH_SEED_ENV, DEFAULT_BENCH_SEED, 0)


def bench_batch_size() -> int | None:
    """The batch size forced by ``MACL_BENCH_BATCH``, or ``None`` (the plans' batch size)."""
    if not os.environ.get(BENCH_BATCH_ENV, "").strip():
        return None
    return _int_from_env(BENCH_BATCH_ENV, 0, 1)


class _BenchSchedule(_AtomicCheckpointMixin, _EnvScheduleMixin):
    """The benchmark schedule plus a seeded process, an optional forced batch size and checkpoints written
    atomically (a run cut by a session's end continues with ``--c``)."""

    schedule_env = DEFAULT_BENCH_SCHEDULE
    schedule_label = "few-label benchmark schedule"
    pair_names = "nnUNetTrainerMACL_bench and nnUNetTrainerScratch_bench"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        seed = self.macl_bench_seed = bench_seed()
        # checkpoint_latest.pth every K epochs: a run stopped between sessions continues from there (--c)
        self.save_every = _int_from_env(BENCH_SAVE_EVERY_ENV, self.save_every, 1)
        _random.seed(seed)
        _np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        forced = bench_batch_size()
        if forced is not None:
            if self.is_ddp:
                raise RuntimeError(f"{BENCH_BATCH_ENV} is not supported with DDP training")
            self.batch_size = forced

    def schedule_description(self) -> str:
        return (f"{super().schedule_description()}, batch size {self.batch_size}"
                f"{' (MACL_BENCH_BATCH)' if bench_batch_size() is not None else ''}, seed {self.macl_bench_seed}")


def bench_schedule() -> tuple[int, int, int]:
    """``(epochs, train iterations per epoch, val iterations per epoch)`` of both benchmark trainers."""
    return _BenchSchedule.schedule()


class nnUNetTrainerMACL_bench(_BenchSchedule, _macl_trainer_module.nnUNetTrainerMACL):
    """MACL fine-tuning with the benchmark schedule and seed (see module doc), nnU-Net's stock recipe.

    Transfers as the paper (encoder + pretrained decoder stages): the few-label arm ``macl`` keeps that meaning
    whatever ``nnUNetTrainerMACL``'s default; ``macl@encoder`` is :class:`nnUNetTrainerMACL_encoder_bench`."""

    finetune_recipe = "stock"
    macl_transfer_scope = "pretrained"


class nnUNetTrainerScratch_bench(_BenchSchedule, _FinetuneRecipeMixin, _nnunet_trainer_module.nnUNetTrainer):
    """Scratch counterpart of :class:`nnUNetTrainerMACL_bench`: same schedule and seed, random initialisation."""

    finetune_recipe = "stock"


class nnUNetTrainerMACL_warmup_bench(nnUNetTrainerMACL_bench):
    """:class:`nnUNetTrainerMACL_bench` with the warm-up recipe (:mod:`nnunetv2_macl.trainers.schedules`)."""

    finetune_recipe = "warmup"


class nnUNetTrainerScratch_warmup_bench(nnUNetTrainerScratch_bench):
    """:class:`nnUNetTrainerScratch_bench` with the warm-up recipe (same as ``nnUNetTrainerMACL_warmup_bench``)."""

    finetune_recipe = "warmup"


class nnUNetTrainerMACL_encoder_bench(nnUNetTrainerMACL_bench):
    """:class:`nnUNetTrainerMACL_bench` transferring the encoder only (the decoder keeps its initialisation)."""

    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_warmup_encoder_bench(nnUNetTrainerMACL_warmup_bench):
    """:class:`nnUNetTrainerMACL_warmup_bench` transferring the encoder only."""

    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_protect_bench(nnUNetTrainerMACL_bench):
    """:class:`nnUNetTrainerMACL_bench` (encoder and pretrained decoder stages) with the protect recipe."""

    finetune_recipe = "protect"


class nnUNetTrainerMACL_protect_encoder_bench(nnUNetTrainerMACL_protect_bench):
    """:class:`nnUNetTrainerMACL_protect_bench` transferring the encoder only."""

    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_rescale_bench(nnUNetTrainerMACL_bench):
    """:class:`nnUNetTrainerMACL_bench` (encoder and pretrained decoder stages) with the rescale recipe."""

    finetune_recipe = "rescale"


class nnUNetTrainerMACL_rescale_encoder_bench(nnUNetTrainerMACL_rescale_bench):
    """:class:`nnUNetTrainerMACL_rescale_bench` transferring the encoder only."""

    macl_transfer_scope = "encoder"
