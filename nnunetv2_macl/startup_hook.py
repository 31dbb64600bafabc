"""Make the MACL trainers visible to stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` with no per-shell step.

nnU-Net 2.8 looks for trainer classes it does not ship in the folders listed in the environment
variable ``nnUNet_extTrainer`` (``os.pathsep``-separated), read when a trainer is looked up. The
package installs ``nnunetv2_macl-trainers.pth`` into site-packages; Python runs its one line at every
interpreter start, which calls :func:`register_trainers`: our trainers folder is appended to
``nnUNet_extTrainer`` once, a user's own entries are kept in front (their trainers win a name clash).

Switch it off with ``MACL_REGISTER_TRAINERS=0`` (or ``false``/``no``/``off``); ``eval
"$(macl_trainer_path)"`` then does the same for one shell. This module imports nothing heavy: it runs
in every Python process of the environment, so it must stay cheap and must never raise.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

SWITCH = "MACL_REGISTER_TRAINERS"
EXT_TRAINER = "nnUNet_extTrainer"
_OFF = {"0", "false", "no", "off"}
# nnunetv2_macl/trainers, found without importing the package (its __init__ is cheap, but this is cheaper)
TRAINERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers")


def ext_trainer_value(existing: str | None = None) -> str:
    """The value ``nnUNet_extTrainer`` should have: ``existing`` with the trainers folder appended once."""
    parts = [p for p in (existing or "").split(os.pathsep) if p.strip()]
    if not any(os.path.abspath(p) == TRAINERS_DIR for p in parts):
        parts.append(TRAINERS_DIR)
    return os.pathsep.join(parts)


def registration_enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    """False when ``MACL_REGISTER_TRAINERS`` is set to 0/false/no/off."""
    environ = os.environ if environ is None else environ
    return environ.get(SWITCH, "").strip().lower() not in _OFF


def register_trainers(environ: MutableMapping[str, str] | None = None) -> bool:
    """Append the trainers folder to ``nnUNet_extTrainer`` in ``environ`` (default: this process).

    Returns whether the variable now names the folder. Never raises: a failure is one line on stderr,
    and nnU-Net then reports the trainer as not found, as it would without this package.
    """
    environ = os.environ if environ is None else environ
    if not registration_enabled(environ):
        return False
    try:
        environ[EXT_TRAINER] = ext_trainer_value(environ.get(EXT_TRAINER))
        return True
    except Exception as e:  # a startup hook must not stop the interpreter
        print(f"nnunetv2_macl: could not add its trainers to {EXT_TRAINER} ({e}); "
              f"use eval \"$(macl_trainer_path)\"", file=sys.stderr)
        return False
