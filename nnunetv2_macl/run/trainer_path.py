"""``macl_trainer_path``: make the MACL trainers visible to stock ``nnUNetv2_train`` / ``nnUNetv2_predict``.

The installed package already does this in every process (``nnunetv2_macl.startup_hook``); this
command is for environments where that hook is switched off (``MACL_REGISTER_TRAINERS=0``) or not
installed (the package on ``PYTHONPATH`` only). nnU-Net 2.8 looks for trainer classes it does not
ship in the folders listed in ``nnUNet_extTrainer`` (``os.pathsep``-separated). Usage::

    eval "$(macl_trainer_path)"
    nnUNetv2_train DATASET 2d 0 -tr nnUNetTrainerMACL

prints ``export nnUNet_extTrainer=<existing value>:<abs path of nnunetv2_macl/trainers>`` (the folder
is appended once; an existing value is kept). ``--dir`` prints only the folder.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from nnunetv2_macl.startup_hook import TRAINERS_DIR, ext_trainer_value  # noqa: F401  (re-exported)


def trainers_dir() -> str:
    return TRAINERS_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="macl_trainer_path",
        description="Print the shell command that adds the MACL trainers to nnUNet_extTrainer. "
                    "Use: eval \"$(macl_trainer_path)\"")
    parser.add_argument("--dir", action="store_true", help="print only the trainers folder")
    args = parser.parse_args(argv)
    if args.dir:
        print(trainers_dir())
    else:
        value = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))
        print(f"export nnUNet_extTrainer={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
