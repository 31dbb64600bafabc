"""``macl_cpu_plan``: add a CPU-sized 2-D configuration (default ``2d_cpu``) beside nnU-Net's native one.

The new configuration inherits the native 2-D configuration and changes only the in-plane spacing, the
patch and the batch size; the network for that patch is planned by nnU-Net's own planner. Then::

    nnUNetv2_preprocess -d DATASET -c 2d_cpu
    nnUNetv2_train DATASET 2d_cpu FOLD
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from nnunetv2_macl.errors import USER_ERRORS
    from nnunetv2_macl.planning.cpu_configuration import (DEFAULT_BATCH, DEFAULT_NAME, DEFAULT_PATCH,
                                                          DEFAULT_SPACING_MM, add_cpu_configuration)

    p = argparse.ArgumentParser(prog="macl_cpu_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (already planned)")
    p.add_argument("-c", "--configuration", default=DEFAULT_NAME, help=f"name of the new configuration "
                   f"(default {DEFAULT_NAME})")
    p.add_argument("-b", "--base", default="2d", help="2-D configuration it inherits from (default 2d)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--spacing", type=float, nargs="+", default=[DEFAULT_SPACING_MM], metavar="MM",
                   help=f"in-plane target spacing in mm, one value or two (default {DEFAULT_SPACING_MM})")
    p.add_argument("--patch", type=int, nargs="+", default=list(DEFAULT_PATCH), metavar="N",
                   help=f"patch size, one value or two (default {DEFAULT_PATCH[0]} {DEFAULT_PATCH[1]})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"fixed batch size (default {DEFAULT_BATCH})")
    p.add_argument("--max-stages", type=int, default=None,
                   help="cap the network's depth (drops nnU-Net's deepest stages); for MACL with N = 2 decoder "
                        "blocks the pretraining crop is 2 x 4 x the total stride, so a 128 patch wants 5 stages")
    p.add_argument("--overwrite", action="store_true", help="replace an existing configuration of that name")
    args = p.parse_args(argv)
    spacing = args.spacing[0] if len(args.spacing) == 1 else args.spacing
    patch = args.patch[0] if len(args.patch) == 1 else args.patch
    try:
        d = add_cpu_configuration(args.dataset, spacing, patch, args.batch_size, args.configuration, args.base,
                                  args.plans, args.overwrite, args.max_stages)
    except USER_ERRORS as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"macl_cpu_plan: error: {text}", file=sys.stderr, flush=True)
        return 2
    print(f"added {d['configuration']} (inherits {d['inherits_from']}): spacing {d['spacing']} mm, patch "
          f"{d['patch_size']}, batch {d['batch_size']}, {d['n_stages']} stages {d['features_per_stage']}, median "
          f"image {d['median_image_size_in_voxels']}, data in {d['data_identifier']}")
    print(f"next: nnUNetv2_preprocess -d {args.dataset} -plans_name {args.plans} -c {d['configuration']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
