"""Named fine-tuning recipes (:mod:`nnunetv2_macl.trainers.schedules`) for stock ``nnUNetv2_train``::

    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_warmup     # MACL start, warm-up recipe
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_stock      # MACL start, nnU-Net's stock recipe (unscaled)
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerScratch_warmup  # random start, warm-up recipe
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_encoder    # MACL encoder only, stock recipe
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_paperTransfer  # encoder + pretrained decoder stages
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_paperTransfer_protect  # the same, protect recipe
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_protect    # MACL encoder, protect recipe
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_rescale    # MACL encoder, filters at nnU-Net's init spread
                                                                      # (what nnUNetTrainerMACL does today)
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMACL_paperTransfer_rescale  # the hand-over, rescale recipe

``nnUNetTrainerMACL`` itself uses the recipe of its ``finetune_recipe`` attribute; scratch with the
stock recipe is nnU-Net's own ``nnUNetTrainer``. nnU-Net imports this file by path and returns the
first attribute of a trainer's name that it meets, so only these classes are public names here.
"""
from __future__ import annotations

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as _nnunet_trainer_module
import nnunetv2_macl.trainers.nnUNetTrainerMACL as _macl_trainer_module
from nnunetv2_macl.trainers.schedules import FinetuneRecipeMixin as _FinetuneRecipeMixin


class nnUNetTrainerMACL_stock(_macl_trainer_module.nnUNetTrainerMACL):
    """MACL encoder start, nnU-Net's stock recipe (SGD lr 1e-2, poly decay)."""

    finetune_recipe = "stock"
    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_warmup(_macl_trainer_module.nnUNetTrainerMACL):
    """MACL encoder start, linear warm-up to lr 1e-3 then poly decay."""

    finetune_recipe = "warmup"
    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_encoder(_macl_trainer_module.nnUNetTrainerMACL):
    """MACL start for the encoder only: the pretrained decoder stages are not transferred (stock recipe).

    ``nnUNetTrainerMACL`` starts from the same encoder and adds the rescale recipe; this name keeps meaning
    encoder-only and stock whatever that default becomes."""

    finetune_recipe = "stock"
    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_paperTransfer(_macl_trainer_module.nnUNetTrainerMACL):
    """MACL start as the paper hands it over: the encoder and the pretrained decoder stages (stock recipe)."""

    finetune_recipe = "stock"
    macl_transfer_scope = "pretrained"


class nnUNetTrainerMACL_protect(_macl_trainer_module.nnUNetTrainerMACL):
    """MACL encoder start, protect recipe: pretrained parts frozen while the new ones warm up, then all of it."""

    finetune_recipe = "protect"
    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_paperTransfer_protect(_macl_trainer_module.nnUNetTrainerMACL):
    """The paper's hand-over (encoder and pretrained decoder stages) with the protect recipe (issue 29)."""

    finetune_recipe = "protect"
    macl_transfer_scope = "pretrained"


class nnUNetTrainerMACL_rescale(_macl_trainer_module.nnUNetTrainerMACL):
    """MACL encoder start, rescale recipe: pretrained filters at nnU-Net's initial output spread, stock optimiser."""

    finetune_recipe = "rescale"
    macl_transfer_scope = "encoder"


class nnUNetTrainerMACL_paperTransfer_rescale(_macl_trainer_module.nnUNetTrainerMACL):
    """The paper's hand-over with the rescale recipe."""

    finetune_recipe = "rescale"
    macl_transfer_scope = "pretrained"


class nnUNetTrainerScratch_warmup(_FinetuneRecipeMixin, _nnunet_trainer_module.nnUNetTrainer):
    """Random start with the warm-up recipe of ``nnUNetTrainerMACL_warmup`` (is a gain a schedule effect?)."""

    finetune_recipe = "warmup"
