"""The errors a user can cause (bad input, bad checkpoint, diverged run): the command-line tools
print these as one line and exit non-zero; anything else is a bug and keeps its traceback."""
from __future__ import annotations

from nnunetv2_macl.data.slice_dataset import DatasetError
from nnunetv2_macl.run.pretrain import UsageError
from nnunetv2_macl.training.checkpoint import CheckpointError
from nnunetv2_macl.training.config import ConfigError
from nnunetv2_macl.training.pretrainer import NonFiniteLossError

USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ConfigError, DatasetError, CheckpointError, NonFiniteLossError, PermissionError, OSError)
