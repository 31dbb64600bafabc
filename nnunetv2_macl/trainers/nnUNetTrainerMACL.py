"""nnU-Net trainers that fine-tune from a MACL pretraining checkpoint.

Use through stock nnU-Net (after ``pip install``, which makes this folder part of ``nnUNet_extTrainer``
in every process: ``nnunetv2_macl.startup_hook``)::

    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL
    nnUNetv2_predict -i IN -o OUT -d DATASET -c 2d -f FOLD -tr nnUNetTrainerMACL

nnU-Net imports this file *by path* as a top-level module (``nnunetv2.utilities.find_objects``),
so it must only use absolute imports (``from nnunetv2_macl...``).

What is handed over: the pretrained **encoder** (``macl_transfer_scope = "encoder"``, chosen by measurement,
docs/RESULTS.md); ``nnUNetTrainerMACL_paperTransfer`` also hands over the pretrained decoder stages, as the
paper. The scope applies to every source below, ``-pretrained_weights`` included. How it is fine-tuned: the
``rescale`` recipe (``finetune_recipe``, chosen by measurement): at training start each handed-over convolution
that an InstanceNorm follows is scaled to the output spread of nnU-Net's initialisation (same function), then
nnU-Net's own optimiser and schedule; ``nnUNetTrainerMACL_stock`` keeps the unscaled weights.

Which weights (first match wins; the README says the same):
1. ``nnUNetv2_train ... -pretrained_weights FILE``: loaded by nnU-Net's ``maybe_load_checkpoint``
   through our safe, lenient loader (see below); nothing else is loaded on top. A
   ``MACL_PRETRAINED`` set at the same time is ignored, and the log says so (the flag is part of
   this command; the variable may be left over in the shell).
2. ``MACL_PRETRAINED=/path/to/checkpoint.pth`` (a dataset the pretraining did not see).
3. The one ``checkpoint_final.pth`` of a pretraining of this dataset: in
   ``$nnUNet_results/<dataset>/MACLPretrainer__<plans>__<configuration>/``, or a multi-dataset
   pretraining stored under another dataset that lists this one.
4. Else the one finished pretraining of any other dataset in ``nnUNet_results`` with the same plans name
   and configuration whose network fits (input channels, network class): pretrain on a pool, fine-tune
   on the labelled set. Several fitting ones are an error that lists them; nothing is trained.
   (:func:`nnunetv2_macl.transfer.find_checkpoint.choose_default_checkpoint`.)
One line at training start says which checkpoint was taken, why, and where the lookup looked.
Resuming (``--c`` with an existing checkpoint) and ``--val`` load nnU-Net's own checkpoint instead:
the resumed weights are kept and no pretrained weights are copied over them.

The pretraining plan may differ from this training's (another dataset's plan): kernels of another
size are adapted and stages matched by resolution (see ``nnunetv2_macl.transfer.load_pretrained``).
The citation of the method is printed when the transfer happens.

The transfer happens in :meth:`nnUNetTrainerMACL.on_train_start`, i.e. after ``initialize()`` and
before the data loaders start (and not inside ``initialize()``: nnU-Net calls ``initialize()`` before
applying ``-pretrained_weights`` and before ``load_checkpoint``, so only at training start is it known
whether weights were already given). It is lenient and reported (log file and stdout); a checkpoint
that does not fit is refused with ``IncompatibleCheckpointError`` (non-zero exit) instead of training
from scratch.

Safety (no unpickling of checkpoint files):
- ``-pretrained_weights``: nnU-Net's ``nnunetv2.run.run_training.maybe_load_checkpoint`` calls the
  module attribute ``load_pretrained_weights``, which reads with ``torch.load(weights_only=False)``
  (arbitrary code execution from a crafted file) and asserts that every key except the segmentation
  layers is present (a MACL checkpoint, whose untrained decoder stages must not be used, or an
  encoder-only one would be rejected). Importing this module replaces that attribute with
  :func:`nnunetv2_macl.transfer.load_pretrained.safe_load_pretrained_weights` (weights_only, lenient,
  reported). The lookup of the trainer class happens before ``maybe_load_checkpoint`` in the same
  process, so the replacement is in place when it is called.
- :meth:`nnUNetTrainerMACL.load_checkpoint` (``--c``, ``--val``) reads nnU-Net's own checkpoints
  with ``weights_only=True``; they hold numpy scalars (training log, ``_best_ema``), which are
  allowed through an explicit minimal allow-list (``numpy._core.multiarray.scalar``, ``numpy.dtype``
  and the numeric dtype classes; see ``numpy_scalar_safe_globals``).
- Not covered: ``nnUNetv2_predict`` reads ``checkpoint_final.pth`` itself with
  ``torch.load(weights_only=False)`` *before* it looks up the trainer class, so no trainer code can
  change that; it reads the model folder you point it at (your own training output).

Variants: ``nnUNetTrainerMACL_{1epoch,5epochs,10epochs,50epochs,100epochs}`` change only the number
of epochs (``_1epoch`` also runs 10 train / 5 val iterations: for tests and the demo), and
``nnUNetTrainerMACL_paperSchedule`` uses the paper's fine-tuning optimiser (Adam, lr 5e-4 cosine to
5e-6 over the epochs, 100 epochs; nnU-Net's loss, data and augmentation are kept). Scratch
counterparts with identical schedules: nnU-Net's own ``nnUNetTrainer_1epoch``, ``_5epochs``,
``_10epochs``, ``_20epochs``, ``_50epochs``, ``_100epochs``, ``_250epochs``, ... (nnunetv2 2.8.1,
``variants/training_length``), plus ``nnUNetTrainerScratch_1epoch`` and
``nnUNetTrainerScratch_paperSchedule`` here for the two schedules nnU-Net does not ship.
"""
from __future__ import annotations

import math
import os
from typing import Union

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_macl.trainers.checkpointing import AtomicCheckpointMixin
from nnunetv2_macl.trainers.schedules import NAMES_KEY, PRETRAINED, ROLE_KEY, FinetuneRecipeMixin
from nnunetv2_macl.transfer.calibrate import Calibration, calibrate_to_reference, draw_calibration_batches
from nnunetv2_macl.transfer.find_checkpoint import CheckpointChoice, choose_default_checkpoint
from nnunetv2_macl.transfer.identity import citation_text
from nnunetv2_macl.transfer.load_pretrained import (
    PRETRAINED_REPORT_ATTR,
    PRETRAINED_SOURCE_ATTR,
    TRANSFER_SCOPE_ATTR,
    TransferReport,
    install_safe_nnunet_pretrained_loader,
    load_weights_only,
    transfer_pretrained_weights,
    unwrap_network,
)

MACL_PRETRAINED_ENV = "MACL_PRETRAINED"

# nnUNetv2_train -pretrained_weights: weights_only + lenient instead of unpickling + all-keys assert.
install_safe_nnunet_pretrained_loader()


class CosineLRScheduler(_LRScheduler):
    """Cosine decay from ``initial_lr`` (step 0) to ``min_lr`` (step ``max_steps``), stepped per epoch.

    Same calling convention as nnU-Net's ``PolyLRScheduler``: ``step(current_epoch)``.
    """

    def __init__(self, optimizer, initial_lr: float, min_lr: float, max_steps: int, current_step: int = None):
        self.optimizer = optimizer
        self.initial_lr = float(initial_lr)
        self.min_lr = float(min_lr)
        self.max_steps = max(1, int(max_steps))
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        t = min(max(step, 0), self.max_steps) / self.max_steps
        return self.min_lr + 0.5 * (self.initial_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(int(current_step))
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


PAPER_INITIAL_LR = 5e-4
PAPER_MIN_LR = 5e-6
PAPER_EPOCHS = 100


def paper_optimizers(trainer: nnUNetTrainer):
    """The paper's fine-tuning optimiser: Adam, lr 5e-4, cosine to 5e-6 over ``trainer.num_epochs``.

    The paper states no weight decay for fine-tuning, so none is used.
    """
    optimizer = torch.optim.Adam(trainer.network.parameters(), lr=PAPER_INITIAL_LR, weight_decay=0.0)
    scheduler = CosineLRScheduler(optimizer, PAPER_INITIAL_LR, PAPER_MIN_LR, max(1, trainer.num_epochs - 1))
    return optimizer, scheduler


class nnUNetTrainerMACL(AtomicCheckpointMixin, FinetuneRecipeMixin, nnUNetTrainer):
    """nnU-Net's trainer, initialised from a MACL-pretrained encoder (see module doc and ``macl_transfer_scope``)."""

    #: ``stock``, ``warmup``, ``protect`` or ``rescale`` (:mod:`nnunetv2_macl.trainers.schedules`); variants
    #: ``nnUNetTrainerMACL_stock``, ``_warmup``, ``_protect`` and ``_rescale`` (``recipe_trainers.py``) fix one.
    #: ``rescale`` by measurement (issue 29, docs/RESULTS.md "The rescale recipe at the plateau"): the pretrained
    #: filters at nnU-Net's initial output spread, the function unchanged, then nnU-Net's stock optimiser.
    #: Hippocampus, 1,000 iterations, M = 4, two folds: +1.60 +- 0.02 Dice over scratch (default objective) and
    #: +1.32 +- 0.59 (--recon-weight 1), where the stock recipe gave +0.56 +- 1.18 and +0.49 +- 0.66; M = 20 +0.62 /
    #: +0.53 (one fold each); far faster early on (+21 over stock after 250 iterations).
    finetune_recipe = "rescale"

    #: refuse a checkpoint when fewer than this fraction of the encoder's tensors fit
    macl_min_fraction = 0.5

    #: ``encoder`` (the decoder keeps nnU-Net's initialisation) or ``pretrained`` (the encoder and the
    #: pretrained decoder stages, as the paper; variant ``nnUNetTrainerMACL_paperTransfer``). Encoder only is
    #: the default by measurement: on Hippocampus at 1,000 iterations the pretrained decoder stages left
    #: fine-tuning about 20 Dice points below scratch with version 0.2.0 (M = 4, 8 pretraining epochs, two
    #: folds: -20.04, sd 0.48, still climbing), and about 10 points below before 0.2.0, with 2 or 8
    #: pretraining epochs (docs/RESULTS.md, "After the review fixes (version 0.2.0, issue 19)"; issue #11).
    macl_transfer_scope = "encoder"

    # the report of the transfer done at training start (None before, or when weights came otherwise)
    macl_transfer_report: TransferReport | None = None
    _macl_resumed = False

    # ---------------------------------------------------------------- which checkpoint
    def macl_checkpoint_choice(self) -> CheckpointChoice:
        """``MACL_PRETRAINED`` if set, else the default lookup (this dataset first, then the one pretraining
        of another dataset whose network fits this training's input channels and network class)."""
        explicit = os.environ.get(MACL_PRETRAINED_ENV, "").strip()
        if explicit:
            if not os.path.isfile(explicit):
                raise FileNotFoundError(f"{MACL_PRETRAINED_ENV}={explicit} does not exist or is not a file.")
            return CheckpointChoice(os.path.abspath(explicit), f"{MACL_PRETRAINED_ENV} is set",
                                    [f"{MACL_PRETRAINED_ENV} (the default lookup was not run)"])
        return choose_default_checkpoint(self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                         self.configuration_name, input_channels=self.num_input_channels,
                                         network_arch_class_name=self.configuration_manager.network_arch_class_name)

    def _macl_metadata_notes(self, meta: dict | None) -> list[str]:
        if not meta:
            return ["the checkpoint has no MACL metadata ('macl'); all tensors except the segmentation "
                    "layers were candidates"]
        notes = []
        here = {"dataset_name": self.plans_manager.dataset_name, "plans_identifier": self.plans_manager.plans_name,
                "configuration": self.configuration_name}
        trained_on = [d.get("dataset_name") for d in meta.get("datasets") or [] if isinstance(d, dict)]
        if len(trained_on) > 1:
            here.pop("dataset_name")
            shares = ", ".join(f"{d.get('dataset_name')} {float(d.get('share', 0)):.0%}" for d in meta["datasets"])
            seen = "including" if self.plans_manager.dataset_name in trained_on else "not including"
            notes.append(f"pretrained on {len(trained_on)} datasets ({shares}), {seen} this one")
        for k, v in here.items():
            if k in meta and str(meta[k]) != str(v):
                notes.append(f"checkpoint {k} is {meta[k]!r}, this training uses {v!r}")
        desc = [f"{k}={meta[k]}" for k in ("method", "decoder_blocks", "epoch", "epochs") if k in meta]
        if desc:
            notes.append("pretraining: " + ", ".join(desc))
        return notes

    def apply_macl_pretrained_weights(self) -> TransferReport | None:
        """Load the MACL weights into ``self.network`` unless weights were given otherwise. Returns the report."""
        mod = unwrap_network(self.network)
        given = getattr(mod, PRETRAINED_SOURCE_ATTR, None)
        if self._macl_resumed:
            self.print_to_log_file("MACL: weights come from the nnU-Net checkpoint being resumed; no pretrained "
                                   "weights are transferred.")
            return None
        if given is not None:
            report = getattr(mod, PRETRAINED_REPORT_ATTR, None)
            ignored = os.environ.get(MACL_PRETRAINED_ENV, "").strip()
            self.print_to_log_file(
                f"MACL: weights were given with -pretrained_weights ({given}); "
                + (f"{MACL_PRETRAINED_ENV}={ignored} is ignored (the flag wins) and " if ignored else
                   f"{MACL_PRETRAINED_ENV} and ")
                + "the default MACL checkpoint are not used.", also_print_to_console=True)
            if report is not None:
                self.print_to_log_file(report.summary(), also_print_to_console=False)
                self._print_citation(report)
            self.macl_transfer_report = report
            return report

        choice = self.macl_checkpoint_choice()
        self.print_to_log_file(choice.summary(), also_print_to_console=True)  # which, why, where: one line
        path = choice.path
        checkpoint = load_weights_only(path)
        meta = checkpoint.get("macl") if isinstance(checkpoint.get("macl"), dict) else None
        report = transfer_pretrained_weights(self.network, checkpoint, min_fraction=self.macl_min_fraction,
                                             log=None, scope=self.macl_transfer_scope)
        report.source = path
        report.notes.extend(self._macl_metadata_notes(meta))
        self.print_to_log_file(report.summary())
        self._print_citation(report)
        self.macl_transfer_report = report
        return report

    def _print_citation(self, report: TransferReport) -> None:
        if report.citation:
            self.print_to_log_file(report.citation, also_print_to_console=True)

    # ---------------------------------------------------------------- nnU-Net hooks
    def initialize(self):
        super().initialize()
        # -pretrained_weights reaches our loader with the network only: it carries the hand-over
        setattr(unwrap_network(self.network), TRANSFER_SCOPE_ATTR, self.macl_transfer_scope)

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        report = self.apply_macl_pretrained_weights()  # before the data loaders start: fail fast
        if self.finetune_recipe == "protect" and report is not None:
            # which parameters are pretrained is known now: the optimiser gets its two groups
            params = {n for n, _ in unwrap_network(self.network).named_parameters()}
            self.rebuild_optimizer(params.intersection(report.loaded))
        super().on_train_start()
        if self.finetune_recipe == "rescale" and report is not None:
            self.calibrate_pretrained_filters(report)

    def calibrate_pretrained_filters(self, report: TransferReport) -> Calibration:
        """The rescale recipe: the loaded convolutions' output spread brought to that of nnU-Net's initialisation
        (:mod:`nnunetv2_macl.transfer.calibrate`), measured on training batches holding at least
        ``MIN_CALIBRATION_IMAGES`` images (the data loaders exist now). Not on ``--c``: the resumed weights were
        calibrated when that training started."""
        reference = self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        batches = draw_calibration_batches(lambda: next(self.dataloader_train)["data"])
        calibration = calibrate_to_reference(self.network, reference, batches, report.loaded)
        if self.is_ddp:  # each rank saw its own batch: every rank takes rank 0's filters
            import torch.distributed as dist

            for p in unwrap_network(self.network).parameters():
                dist.broadcast(p.data, 0)
        self.print_to_log_file(calibration.summary(), also_print_to_console=True)
        return calibration

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """nnU-Net's ``load_checkpoint`` with ``weights_only=True`` reading (see module doc).

        Same behaviour otherwise (also fixes the stock version's failure when given a dict).
        """
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            checkpoint = load_weights_only(os.fspath(filename_or_checkpoint), map_location=self.device)
        else:
            checkpoint = filename_or_checkpoint
        self._macl_resumed = True

        mod = unwrap_network(self.network)
        own_keys = mod.state_dict().keys()
        new_state_dict = {}
        for k, value in checkpoint["network_weights"].items():
            key = k
            if key not in own_keys and key.startswith("module."):
                key = key[7:]
            new_state_dict[key] = value

        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        mod.load_state_dict(new_state_dict)
        saved_groups = checkpoint["optimizer_state"]["param_groups"]
        pretrained = [g.get(NAMES_KEY, []) for g in saved_groups if g.get(ROLE_KEY) == PRETRAINED]
        if self.finetune_recipe == "protect" and pretrained:  # the protect recipe's groups, as they were saved
            self.rebuild_optimizer(pretrained[0])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])


# ------------------------------------------------------------------------------------ length variants
class nnUNetTrainerMACL_1epoch(nnUNetTrainerMACL):
    """1 epoch of 10 training / 5 validation iterations: smoke tests and the demo only."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 5


class nnUNetTrainerMACL_5epochs(nnUNetTrainerMACL):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerMACL_10epochs(nnUNetTrainerMACL):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10


class nnUNetTrainerMACL_50epochs(nnUNetTrainerMACL):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerMACL_100epochs(nnUNetTrainerMACL):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class nnUNetTrainerMACL_paperSchedule(nnUNetTrainerMACL):
    """The paper's fine-tuning: Adam, lr 5e-4 cosine to 5e-6, 100 epochs, the weights as pretrained; nnU-Net's loss
    kept."""

    finetune_recipe = "stock"  # the paper's form: no rescale (its optimiser replaces the stock one)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = PAPER_EPOCHS
        self.initial_lr = PAPER_INITIAL_LR  # logged by nnU-Net as a hyperparameter
        self.weight_decay = 0.0

    def configure_optimizers(self):
        return paper_optimizers(self)

    def recipe_description(self) -> str:
        return (f"fine-tuning recipe: the paper's (Adam, lr {PAPER_INITIAL_LR:g} cosine to {PAPER_MIN_LR:g} over "
                f"{self.num_epochs} epochs, no weight decay; the weights as pretrained, no rescale)")


# ------------------------------------------------------------------------------------ scratch counterparts
class nnUNetTrainerScratch_1epoch(nnUNetTrainer):
    """Scratch counterpart of ``nnUNetTrainerMACL_1epoch`` (same 1 x 10 / 5 iterations)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 5


class nnUNetTrainerScratch_paperSchedule(nnUNetTrainer):
    """Scratch counterpart of ``nnUNetTrainerMACL_paperSchedule`` (same optimiser and epochs)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = PAPER_EPOCHS
        self.initial_lr = PAPER_INITIAL_LR
        self.weight_decay = 0.0

    def configure_optimizers(self):
        return paper_optimizers(self)
