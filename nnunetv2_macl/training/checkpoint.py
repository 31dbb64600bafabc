"""Atomic checkpoint writing and safe checkpoint reading.

Writing: temporary file in the target folder, fsync, then ``os.replace`` so that a reader (or a
crash, or ``kill -9``) only ever sees the previous complete file or the new complete file, never
half of one. A failed write (disk full, permission) removes its temporary file and leaves the
previous file untouched.

Reading: ``torch.load(weights_only=True)`` always. A checkpoint that needs arbitrary unpickling
(i.e. could execute code) is refused with :class:`CheckpointError`, as is a truncated or
corrupt file.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from typing import Any

import torch
from nnunetv2_macl.errors import CheckpointError

TMP_PREFIX = ".tmp_"


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask); mkstemp uses 0o600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_checkpoint_atomic(obj: dict, path: str) -> None:
    """Write ``obj`` with torch.save to ``path`` atomically (tmp file + fsync + rename).

    On any failure (disk full, permission) the temporary file is removed and the previous file at
    ``path`` is left untouched; the exception propagates.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                os.fchmod(f.fileno(), _file_mode())
            except (AttributeError, OSError):  # pragma: no cover - e.g. Windows
                pass
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
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
        except OSError:
            pass
        raise


def _first_line(e: BaseException) -> str:
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` on any problem.

    Files that would need arbitrary unpickling (globals other than tensors and plain containers)
    are refused without executing anything; truncated, empty or garbage files are reported as
    corrupt. Every message is one line.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"Checkpoint {path} is corrupt or truncated (empty file)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here; we name the cause
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe or "Unsupported class" in text:
            what = f" (it references {unsafe.group(1)})" if unsafe else ""
            raise CheckpointError(
                f"Refusing to load {path}: it contains pickled objects other than tensors and plain "
                f"containers{what}; loading it could execute code. Only weights_only checkpoints are accepted."
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = detail.group(1).strip() if detail else _first_line(e)
        reason = reason.split(". ")[0].rstrip(".")  # torch appends advice sentences
        if len(reason) > 200:
            reason = reason[:200] + "..."
        raise CheckpointError(f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {reason})") \
            from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"Checkpoint {path} does not hold a dict (found {type(ckpt).__name__})")
    return ckpt
