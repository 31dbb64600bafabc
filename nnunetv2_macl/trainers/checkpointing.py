"""nnU-Net checkpoints written so that a kill cannot leave a truncated one.

nnU-Net's ``save_checkpoint`` calls ``torch.save`` on ``checkpoint_latest.pth`` in place. A run killed while it
writes (a session that ends, ``kill -9``, a full disk) leaves a truncated file, and ``nnUNetv2_train --c`` then
fails with ``EOFError: Ran out of input`` instead of continuing from the previous epoch's checkpoint. With
tiny epochs the write is a large share of the time (the few-label test that cuts a run saw it). Here nnU-Net
writes the same checkpoint to a temporary file beside it, which is flushed to disk and renamed over the
target: the file at ``checkpoint_latest.pth`` is always a whole checkpoint, the old one or the new one.
"""
from __future__ import annotations

import os

from nnunetv2_macl.training.checkpoint import TMP_PREFIX


class AtomicCheckpointMixin:
    """Mix in before an nnU-Net trainer class: ``save_checkpoint`` writes a temporary file and renames it."""

    def save_checkpoint(self, filename: str) -> None:
        folder, name = os.path.split(os.path.abspath(filename))
        tmp = os.path.join(folder, f"{TMP_PREFIX}{name}.{os.getpid()}")
        try:
            super().save_checkpoint(tmp)
            if os.path.isfile(tmp):  # only the process that writes (rank 0, checkpointing on) has one
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
