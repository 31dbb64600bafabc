"""``macl_prepare_unlabeled``: a folder of unlabeled scans -> an nnU-Net raw dataset for MACL pretraining.

    macl_prepare_unlabeled -i FOLDER -d ID -n NAME [--modality CT|MRI]
    nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres        # or 2d
    macl_pretrain -d ID -c 3d_fullres

See :mod:`nnunetv2_macl.data.prepare_unlabeled` and docs/UNLABELED.md.
"""
from __future__ import annotations

import argparse
import sys

from nnunetv2_macl.data.prepare_unlabeled import (
    DEFAULT_CT_THRESHOLD, MODALITIES, UnlabeledDataError, prepare_unlabeled_dataset)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="macl_prepare_unlabeled",
        description="Turn a folder of unlabeled single-channel 3-D scans (NIfTI, NRRD, MetaImage files or DICOM "
                    "series, searched recursively) into $nnUNet_raw/DatasetXXX_NAME with a body (CT) or "
                    "foreground (MRI) mask as label, so that nnUNetv2_plan_and_preprocess and macl_pretrain accept "
                    "it. Multi-channel inputs are out of scope.")
    p.add_argument("-i", dest="input_folder", required=True, help="folder with the images (searched recursively)")
    p.add_argument("-d", dest="dataset_id", required=True, type=int, help="new nnU-Net dataset id (1-999, unused)")
    p.add_argument("-n", dest="name", required=True, help="dataset name: DatasetXXX_NAME, cases NAME_XXX")
    p.add_argument("--modality", default="CT", type=str.upper, choices=list(MODALITIES),
                   help="CT (body mask, nnU-Net CT normalisation) or MRI (Otsu foreground mask); default CT")
    p.add_argument("--ct-threshold", type=float, default=DEFAULT_CT_THRESHOLD,
                   help=f"CT body mask: voxels above this many HU (default {DEFAULT_CT_THRESHOLD:g})")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="processes for the conversion (default: nnUNet_def_n_proc or 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = prepare_unlabeled_dataset(args.input_folder, args.dataset_id, args.name, args.modality,
                                           num_processes=args.num_processes, ct_threshold=args.ct_threshold)
    except (UnlabeledDataError, OSError) as e:
        print(f"macl_prepare_unlabeled: error: {e}", file=sys.stderr)
        return 2
    print(f"Next:\n  nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres   (or -c 2d; add "
          f"--verify_dataset_integrity to let nnU-Net check the files)\n"
          f"  macl_pretrain -d {args.dataset_id} -c 3d_fullres")
    return 0


if __name__ == "__main__":
    sys.exit(main())
