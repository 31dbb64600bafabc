"""Folder that ``nnUNet_extTrainer`` points at (added by the installed startup hook,
``nnunetv2_macl.startup_hook``, or by ``eval "$(macl_trainer_path)"``).

nnU-Net imports the modules of this folder by file path as top-level modules; this ``__init__`` is
not imported by that search and is kept free of imports so that ``import nnunetv2_macl.trainers``
(used by ``macl_trainer_path`` to find the folder) stays cheap. Import the trainers explicitly with
``from nnunetv2_macl.trainers.nnUNetTrainerMACL import nnUNetTrainerMACL``.
"""
import os

TRAINERS_DIR = os.path.dirname(os.path.abspath(__file__))
