"""Pretrained checkpoint -> nnU-Net network: lenient, reported transfer; input channels, kernel sizes
and depth adapted across plans."""
from nnunetv2_macl.transfer.find_checkpoint import (
    CheckpointChoice,
    CheckpointNotFoundError,
    choose_default_checkpoint,
    find_default_checkpoint,
)
from nnunetv2_macl.transfer.load_pretrained import (
    IncompatibleCheckpointError,
    TransferReport,
    load_weights_only,
    safe_load_pretrained_weights,
    transfer_pretrained_weights,
)

__all__ = [
    "CheckpointChoice", "CheckpointNotFoundError", "IncompatibleCheckpointError", "TransferReport",
    "choose_default_checkpoint", "find_default_checkpoint",
    "load_weights_only", "safe_load_pretrained_weights", "transfer_pretrained_weights",
]
