"""The errors a user can cause (bad input, bad checkpoint, diverged run, failed step), in one hierarchy.

Every class derives from :class:`MACLUserError`; the command-line tools print these as one line and
exit non-zero; anything else is a bug and keeps its traceback. This module imports nothing from the
package (the modules that raise these import them from here), so it can never be part of a cycle.
Each class also derives from the builtin a caller would expect (``ValueError`` for bad input,
``RuntimeError`` for a failed run, ``FileNotFoundError`` for a missing checkpoint).
"""
from __future__ import annotations


class MACLUserError(Exception):
    """Base of every error a user can cause; the message says what and how to fix it, in one line."""


class UsageError(MACLUserError, ValueError):
    """Bad command-line input that is not a pretraining option (dataset, plans, environment)."""


class ConfigError(MACLUserError, ValueError):
    """An option is invalid; the message says which and why."""


class DatasetError(MACLUserError, ValueError):
    """The preprocessed data cannot be used for pretraining; the message says why."""


class IncompatibleDatasetsError(DatasetError):
    """A dataset of a multi-dataset pretraining cannot feed the network of the chosen plan."""


class UnlabeledDataError(DatasetError):
    """The input folder or the target dataset cannot be used; the message says why (and names the file)."""


class CheckpointError(MACLUserError, RuntimeError):
    """A checkpoint could not be read, written, or does not fit; the message says why in one line."""


class IncompatibleCheckpointError(MACLUserError, RuntimeError):
    """The checkpoint does not fit the network (too few tensors match); the message names the keys."""


class UnsupportedCheckpointFormatError(MACLUserError, ValueError):
    """The checkpoint was written by a newer, incompatible version of this package."""


class CheckpointNotFoundError(MACLUserError, FileNotFoundError):
    """No (or no unambiguous) default MACL checkpoint; the message says what to do."""


class NonFiniteLossError(MACLUserError, RuntimeError):
    """The loss became NaN/inf; the message names the step and the component."""


class StepError(MACLUserError, RuntimeError):
    """A step run as a subprocess (pretraining, training) failed; the message says which and where to look."""


class FewLabelError(MACLUserError, ValueError):
    """A few-label protocol setting is invalid or its folder cannot be used; the message says which."""


USER_ERRORS: tuple[type[BaseException], ...] = (MACLUserError, PermissionError, OSError)
"""What the console scripts report as one line (file-system errors included)."""
