"""Atomic checkpoint writing and safe checkpoint reading.

Writing: temporary file in the target folder, fsync, then ``os.replace`` so that a reader (or a
crash) only ever sees the previous complete file or the new complete file, never half of one.

Reading: ``torch.load(weights_only=True)`` always. A checkpoint that needs arbitrary unpickling
(i.e. could execute code) is refused with :class:`CheckpointError`, as is a truncated or
corrupt file.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit; the message says why in one line."""


def save_checkpoint_atomic(obj: dict, path: str) -> None:
    """Write ``obj`` with torch.save to ``path`` atomically (tmp file + fsync + rename).

    On any failure (disk full, permission) the temporary file is removed and the previous file at
    ``path`` is left untouched; the exception propagates.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` on any problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here; we name the cause
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "WeightsUnpickler" in str(e):
            raise CheckpointError(
                f"Refusing to load {path}: it contains pickled objects other than tensors and plain "
                f"containers (loading it could execute code). Only weights_only checkpoints are accepted."
            ) from None
        raise CheckpointError(f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {msg})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"Checkpoint {path} does not hold a dict (found {type(ckpt).__name__})")
    return ckpt
