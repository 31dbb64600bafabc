"""MACL losses: L_MLC = l1 Lg + l2 Ld + l3 LER (Zeng et al., MACL, eq. 10-13)."""

from .dense_contrastive import DENSE_CONTRASTS, DENSE_FORMS, DenseContrastiveLoss, dense_contrastive_loss
from .equivariance import EquivarianceLoss, equivariance_loss
from .global_contrastive import GlobalContrastiveLoss, global_contrastive_loss
from .multilevel import MultiLevelContrastiveLoss
from .supcon import (
    POSITIVE_MODES,
    PositionSupConLoss,
    instance_positive_mask,
    masked_supcon_loss,
    position_positive_mask,
)

__all__ = [
    "DENSE_CONTRASTS",
    "DENSE_FORMS",
    "POSITIVE_MODES",
    "DenseContrastiveLoss",
    "EquivarianceLoss",
    "GlobalContrastiveLoss",
    "MultiLevelContrastiveLoss",
    "PositionSupConLoss",
    "dense_contrastive_loss",
    "equivariance_loss",
    "global_contrastive_loss",
    "instance_positive_mask",
    "masked_supcon_loss",
    "position_positive_mask",
]
