"""Fine-tuning recipes: one switch shared by ``nnUNetTrainerMACL`` and the scratch/benchmark trainers.

``stock``  nnU-Net's own: SGD (momentum 0.99, Nesterov), lr 1e-2, poly decay (exponent 0.9) over the
           epochs (``nnUNetTrainer.configure_optimizers``).
``warmup`` the idea of nnU-Net's pretrained fine-tuning (master branch, ``PretrainedTrainer`` and
           ``nnUNetTrainer_warmup``): the same SGD, but the lr rises linearly from ``peak/W`` to the
           peak over the first W epochs (every layer trains: the randomly initialised parts, e.g. the
           segmentation layers, settle before the pretrained ones take full steps), then nnU-Net's poly
           decay from the peak over the remaining epochs. Peak lr 1e-3 (``PretrainedTrainer``'s value
           for pretrained starts; nnU-Net uses 1e-2 from scratch); W = 5 % of the epochs (nnU-Net: 50 of
           1000), at least 1. Both can be changed with ``MACL_FT_PEAK_LR`` / ``MACL_FT_WARMUP_EPOCHS``
           (read when the optimiser is built, written to the training log).

The scheduler is stateless in the epoch (``step(current_epoch)`` as nnU-Net's ``PolyLRScheduler``), so a
training resumed with ``--c`` continues on the same curve. A trainer picks its recipe with the class
attribute ``finetune_recipe`` of :class:`FinetuneRecipeMixin` (mix it in before the nnU-Net trainer).
"""
from __future__ import annotations

import os

import torch
from torch.optim.lr_scheduler import _LRScheduler

RECIPES = ("stock", "warmup")
WARMUP_PEAK_LR = 1e-3
WARMUP_FRACTION = 0.05
POLY_EXPONENT = 0.9
PEAK_LR_ENV = "MACL_FT_PEAK_LR"
WARMUP_EPOCHS_ENV = "MACL_FT_WARMUP_EPOCHS"


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up to ``peak_lr`` over ``warmup_epochs`` epochs, then poly decay to 0 at ``num_epochs``."""

    def __init__(self, optimizer, peak_lr: float, num_epochs: int, warmup_epochs: int, current_step: int = None):
        self.optimizer = optimizer
        self.peak_lr = float(peak_lr)
        self.num_epochs = int(num_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, epoch: int) -> float:
        epoch = max(0, int(epoch))
        if epoch < self.warmup_epochs:
            return self.peak_lr * (epoch + 1) / self.warmup_epochs
        decay_epochs = max(1, self.num_epochs - self.warmup_epochs)
        return self.peak_lr * max(0.0, 1 - (epoch - self.warmup_epochs) / decay_epochs) ** POLY_EXPONENT

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(int(current_step))
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _float_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def warmup_settings(num_epochs: int) -> tuple[float, int]:
    """``(peak lr, warm-up epochs)`` of the warm-up recipe for a training of ``num_epochs`` epochs."""
    peak = _float_from_env(PEAK_LR_ENV, WARMUP_PEAK_LR)
    text = os.environ.get(WARMUP_EPOCHS_ENV, "").strip()
    if text:
        try:
            warmup = int(text)
        except ValueError:
            raise ValueError(f"{WARMUP_EPOCHS_ENV}={text!r} is not an integer") from None
        if not 1 <= warmup < max(2, num_epochs):
            raise ValueError(f"{WARMUP_EPOCHS_ENV} must be in 1..{max(1, num_epochs - 1)} (the training has "
                             f"{num_epochs} epochs), got {warmup}")
    else:
        warmup = max(1, round(WARMUP_FRACTION * num_epochs))
    return peak, min(warmup, max(1, num_epochs - 1))


class FinetuneRecipeMixin:
    """Mix in before an nnU-Net trainer class; ``finetune_recipe`` selects the optimiser and lr schedule."""

    finetune_recipe = "stock"

    def configure_optimizers(self):
        if self.finetune_recipe not in RECIPES:
            raise ValueError(f"{type(self).__name__}.finetune_recipe must be one of {RECIPES}, "
                             f"got {self.finetune_recipe!r}")
        if self.finetune_recipe == "stock":
            return super().configure_optimizers()
        peak, warmup = warmup_settings(self.num_epochs)
        self.initial_lr = peak  # what nnU-Net records as the trainer's lr (debug.json)
        optimizer = torch.optim.SGD(self.network.parameters(), peak, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, WarmupPolyLRScheduler(optimizer, peak, self.num_epochs, warmup)

    def recipe_description(self) -> str:
        if self.finetune_recipe == "stock":
            return (f"fine-tuning recipe: stock (nnU-Net's SGD, lr {self.initial_lr:g}, poly decay over "
                    f"{self.num_epochs} epochs)")
        peak, warmup = warmup_settings(self.num_epochs)
        return (f"fine-tuning recipe: warmup (SGD momentum 0.99 Nesterov, lr rising linearly to {peak:g} over "
                f"{warmup} epoch(s), then poly decay over the remaining {self.num_epochs - warmup})")

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(self.recipe_description(), also_print_to_console=True)
