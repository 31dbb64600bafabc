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
``protect`` for a start whose pretrained parts sit beside freshly initialised ones (the decoder hand-over,
           issue 29; the "sawtooth" of LP-FT, Kumar et al., ICLR 2022: a random head trained on top of
           pretrained features first distorts them). Two parameter groups, the parts the transfer loaded
           (``pretrained``) and the rest (``new``). For the first F epochs the pretrained parts are frozen
           (``requires_grad`` off, so SGD keeps no momentum for them) while the new parts warm up linearly to
           the peak; then every part warms up again linearly over W epochs; then nnU-Net's poly decay to 0.
           Peak lr 1e-2 (nnU-Net's own: a 1e-3 peak lost 9 points at 1,000 iterations, docs/RESULTS.md),
           F = 15 % of the epochs, W = 5 %; the pretrained group's lr is ``factor`` x the schedule (1 by
           default; < 1 is the "smaller learning rate on the pretrained parts" remedy). Environment:
           ``MACL_FT_PEAK_LR``, ``MACL_FT_WARMUP_EPOCHS`` (W), ``MACL_FT_FREEZE_EPOCHS`` (F, 0 = no freeze),
           ``MACL_FT_PRETRAINED_LR_FACTOR``. Which parameters are pretrained is known only after the transfer
           (at training start), so the trainer rebuilds the optimiser then; each group stores its role and
           parameter names, so ``--c`` rebuilds the same groups from the checkpoint.
``rescale`` nnU-Net's stock optimiser and schedule, after every pretrained convolution that an InstanceNorm
           follows is rescaled, filter by filter, to the output spread of nnU-Net's initialisation on one training
           batch (:mod:`nnunetv2_macl.transfer.calibrate`). The network computes the same function, but a filter
           whose spread had grown s-fold (3-6 x measured) no longer moves 1/s^2 as fast relative to its size as
           a fresh one: the pretrained parts fine-tune at nnU-Net's effective learning rate.

The scheduler is stateless in the epoch (``step(current_epoch)`` as nnU-Net's ``PolyLRScheduler``), so a
training resumed with ``--c`` continues on the same curve. A trainer picks its recipe with the class
attribute ``finetune_recipe`` of :class:`FinetuneRecipeMixin` (mix it in before the nnU-Net trainer).
"""
from __future__ import annotations

import os

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2_macl.transfer.load_pretrained import unwrap_network

RECIPES = ("stock", "warmup", "protect", "rescale")
#: recipes that act on the pretrained parts (a scratch start has none)
PRETRAINED_ONLY_RECIPES = ("protect", "rescale")
WARMUP_PEAK_LR = 1e-3
PROTECT_PEAK_LR = 1e-2
WARMUP_FRACTION = 0.05
FREEZE_FRACTION = 0.15
POLY_EXPONENT = 0.9
PEAK_LR_ENV = "MACL_FT_PEAK_LR"
WARMUP_EPOCHS_ENV = "MACL_FT_WARMUP_EPOCHS"
FREEZE_EPOCHS_ENV = "MACL_FT_FREEZE_EPOCHS"
PRETRAINED_LR_FACTOR_ENV = "MACL_FT_PRETRAINED_LR_FACTOR"
ROLE_KEY = "macl_role"             # parameter-group keys kept in the optimiser's state_dict
NAMES_KEY = "macl_param_names"
PRETRAINED, NEW = "pretrained", "new"


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


def _epochs_from_env(name: str, default: int, num_epochs: int, minimum: int) -> int:
    """An epoch count in ``minimum..num_epochs - 1`` from ``name`` (``default`` when unset); clear errors."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None
    if not minimum <= value < max(2, num_epochs):
        raise ValueError(f"{name} must be in {minimum}..{max(1, num_epochs - 1)} (the training has "
                         f"{num_epochs} epochs), got {value}")
    return value


def warmup_settings(num_epochs: int) -> tuple[float, int]:
    """``(peak lr, warm-up epochs)`` of the warm-up recipe for a training of ``num_epochs`` epochs."""
    peak = _float_from_env(PEAK_LR_ENV, WARMUP_PEAK_LR)
    warmup = _epochs_from_env(WARMUP_EPOCHS_ENV, max(1, round(WARMUP_FRACTION * num_epochs)), num_epochs, 1)
    return peak, min(warmup, max(1, num_epochs - 1))


def protect_settings(num_epochs: int) -> tuple[float, int, int, float]:
    """``(peak lr, freeze epochs F, warm-up epochs W, pretrained lr factor)`` of the protect recipe."""
    peak = _float_from_env(PEAK_LR_ENV, PROTECT_PEAK_LR)
    freeze = _epochs_from_env(FREEZE_EPOCHS_ENV, round(FREEZE_FRACTION * num_epochs), num_epochs, 0)
    warmup = _epochs_from_env(WARMUP_EPOCHS_ENV, max(1, round(WARMUP_FRACTION * num_epochs)), num_epochs, 1)
    if freeze + warmup >= num_epochs:
        raise ValueError(f"protect recipe: freeze ({freeze}) + warm-up ({warmup}) epochs must leave some of the "
                         f"{num_epochs} epochs for the decay ({FREEZE_EPOCHS_ENV}, {WARMUP_EPOCHS_ENV})")
    factor = _float_from_env(PRETRAINED_LR_FACTOR_ENV, 1.0)
    return peak, freeze, warmup, factor


class ProtectLRScheduler(_LRScheduler):
    """The protect recipe's per-group rate: epochs < F new parts warm up (pretrained frozen, rate 0); then all
    parts warm up over W epochs; then poly decay to 0 at ``num_epochs``; pretrained group x ``factor``."""

    def __init__(self, optimizer, peak_lr: float, num_epochs: int, freeze_epochs: int, warmup_epochs: int,
                 pretrained_factor: float = 1.0, current_step: int = None):
        self.optimizer = optimizer
        self.peak_lr, self.num_epochs = float(peak_lr), int(num_epochs)
        self.freeze_epochs, self.warmup_epochs = int(freeze_epochs), int(warmup_epochs)
        self.pretrained_factor = float(pretrained_factor)
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def frozen(self, epoch: int) -> bool:
        """Whether the pretrained parts are frozen in ``epoch``."""
        return int(epoch) < self.freeze_epochs

    def lr_at(self, epoch: int, role: str = NEW) -> float:
        epoch, f, w = max(0, int(epoch)), self.freeze_epochs, self.warmup_epochs
        if epoch < f:
            base = 0.0 if role == PRETRAINED else self.peak_lr * (epoch + 1) / f
        elif epoch < f + w:
            base = self.peak_lr * (epoch - f + 1) / w
        else:
            decay = max(1, self.num_epochs - f - w)
            base = self.peak_lr * max(0.0, 1 - (epoch - f - w) / decay) ** POLY_EXPONENT
        return base * (self.pretrained_factor if role == PRETRAINED else 1.0)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(int(current_step), group.get(ROLE_KEY, NEW))
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def role_groups(network: torch.nn.Module, pretrained_names: set[str]) -> list[dict]:
    """SGD parameter groups ``new`` then ``pretrained`` (empty groups left out), each with its role and names."""
    named = {NEW: [], PRETRAINED: []}
    for name, param in network.named_parameters():
        named[PRETRAINED if name in pretrained_names else NEW].append((name, param))
    return [{"params": [p for _, p in pairs], ROLE_KEY: role, NAMES_KEY: [n for n, _ in pairs]}
            for role, pairs in named.items() if pairs]


class FinetuneRecipeMixin:
    """Mix in before an nnU-Net trainer class; ``finetune_recipe`` selects the optimiser and lr schedule.

    ``protect`` needs to know which parameters are pretrained: a subclass sets ``macl_pretrained_names``
    (network parameter names) and calls :meth:`rebuild_optimizer` once the transfer has happened."""

    finetune_recipe = "stock"
    #: names of the parameters the transfer loaded (protect recipe); empty until the transfer
    macl_pretrained_names: frozenset = frozenset()

    def configure_optimizers(self):
        if self.finetune_recipe not in RECIPES:
            raise ValueError(f"{type(self).__name__}.finetune_recipe must be one of {RECIPES}, "
                             f"got {self.finetune_recipe!r}")
        if self.finetune_recipe in ("stock", "rescale"):  # rescale acts at the transfer, not on the optimiser
            return super().configure_optimizers()
        if self.finetune_recipe == "protect":
            peak, freeze, warmup, factor = protect_settings(self.num_epochs)
            self.initial_lr = peak
            groups = role_groups(unwrap_network(self.network), set(self.macl_pretrained_names))
            optimizer = torch.optim.SGD(groups, peak, weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
            return optimizer, ProtectLRScheduler(optimizer, peak, self.num_epochs, freeze, warmup, factor)
        peak, warmup = warmup_settings(self.num_epochs)
        self.initial_lr = peak  # what nnU-Net records as the trainer's lr (debug.json)
        optimizer = torch.optim.SGD(self.network.parameters(), peak, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, WarmupPolyLRScheduler(optimizer, peak, self.num_epochs, warmup)

    def rebuild_optimizer(self, pretrained_names) -> None:
        """Protect recipe: new optimiser and scheduler with ``pretrained_names`` as the pretrained group."""
        self.macl_pretrained_names = frozenset(pretrained_names)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def recipe_description(self) -> str:
        if self.finetune_recipe == "stock":
            return (f"fine-tuning recipe: stock (nnU-Net's SGD, lr {self.initial_lr:g}, poly decay over "
                    f"{self.num_epochs} epochs)")
        if self.finetune_recipe == "rescale":
            return (f"fine-tuning recipe: rescale (pretrained filters at the output spread of nnU-Net's initialisation; "
                    f"nnU-Net's SGD, lr "
                    f"{self.initial_lr:g}, poly decay over {self.num_epochs} epochs)")
        if self.finetune_recipe == "protect":
            peak, freeze, warmup, factor = protect_settings(self.num_epochs)
            n = len(self.macl_pretrained_names)
            return (f"fine-tuning recipe: protect (SGD momentum 0.99 Nesterov; the {n} pretrained parameter tensors "
                    f"frozen for {freeze} epoch(s) while the new parts warm up to lr {peak:g}, then every part warms "
                    f"up over {warmup} epoch(s), then poly decay over the remaining {self.num_epochs - freeze - warmup};"
                    f" pretrained lr x {factor:g})")
        peak, warmup = warmup_settings(self.num_epochs)
        return (f"fine-tuning recipe: warmup (SGD momentum 0.99 Nesterov, lr rising linearly to {peak:g} over "
                f"{warmup} epoch(s), then poly decay over the remaining {self.num_epochs - warmup})")

    def on_train_start(self):
        super().on_train_start()
        if self.finetune_recipe == "protect" and not self.macl_pretrained_names:
            raise RuntimeError(f"{type(self).__name__}: the protect recipe needs pretrained parts to protect, and "
                               f"nothing was transferred (a scratch start takes the stock or warmup recipe)")
        self.print_to_log_file(self.recipe_description(), also_print_to_console=True)

    def on_train_epoch_start(self):
        if self.finetune_recipe == "protect":  # before the step: requires_grad decides what SGD moves
            frozen = self.lr_scheduler.frozen(self.current_epoch)
            for group in self.optimizer.param_groups:
                if group.get(ROLE_KEY) == PRETRAINED:
                    for p in group["params"]:
                        p.requires_grad_(not frozen)
        super().on_train_epoch_start()
        if self.finetune_recipe == "protect":
            lrs = ", ".join(f"{g.get(ROLE_KEY, NEW)} {g['lr']:.5f}" for g in self.optimizer.param_groups)
            frozen = " (pretrained parts frozen)" if self.lr_scheduler.frozen(self.current_epoch) else ""
            self.print_to_log_file(f"protect recipe, learning rates: {lrs}{frozen}")
