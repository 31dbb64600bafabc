"""Why does handing the MACL-pretrained decoder stages to nnU-Net fine-tuning lose against the encoder only?

A thin command line over :mod:`nnunetv2_macl.diagnosis` (the measurements live there). On a labeled
nnU-Net preprocessed dataset (2d), for one ``macl_pretrain`` checkpoint (``--parts``, default all; the
issue's names E1..E4 work too):

(e1) E1: the decoder stages at iteration 0 on the validation slices, hand-over against the encoder-only
    start: per InstanceNorm mean |weight - 1| and |bias|, mean |x| of the output, the share of
    pre-activations below zero, the cosine between locations of a slice, the RMS of the upsampled and of
    the skip half of each stage input, the std of the stage's deep-supervision logits.

(a) Variance decomposition of every stage the pretraining trained (encoder stage outputs incl. the
    bottleneck; decoder stages 1..N), pretrained against the encoder-only start (the same pretrained
    encoder, nnU-Net's initialisation of the decoder: the reference for the decoder stages) and against
    the same architecture at random initialisation (same seed). Every stage is also measured before its
    last InstanceNorm (``<stage>@pre-norm``: the last convolution's output), where the across-slice
    variance is not normalised away slice by slice. Per channel, the variance of a feature over all content cells of all validation slices
    splits exactly into ``spatial`` (the mean over slices of the within-slice variance, weighted by the
    slice's number of cells) plus ``across`` (the weighted variance over slices of the slice's spatial
    mean). Reported: ``spatial_fraction`` = mean over live channels of spatial / total, and
    ``position_share`` = mean over live channels of the share of the across-slice variance explained by
    the slice position (10 position bins, eta^2). Done on the full-resolution slice (what fine-tuning
    feeds) and on the dominant-branch input ``MACLNetwork.down(slice)`` (what the pretraining loss saw).
(b) Linear probe: a 1x1 convolution on the frozen features of each stage -> classes, logits upsampled
    bilinearly to the slice (cell j of stride t sits on pixel t*j, nnU-Net's geometry), trained with
    cross-entropy (+ soft Dice) on the training cases' slices (33 % of each batch forced to hold
    foreground, as nnU-Net samples), evaluated as foreground Dice per class on every (or
    ``--max-val-slices``) slices of the validation cases, per volume then averaged over volumes
    (nnU-Net's convention; a class absent from reference and prediction is skipped), plus the global
    Dice over all voxels.
(c) E2: the first K (``--finetune-iters``, 150) fine-tuning iterations from the starts of ``--starts``, built
    with the same seed: ``scratch``, ``encoder`` (scope="encoder"), ``pretrained`` (scope="pretrained", the
    paper's hand-over), ``pretrained_norms_reset`` (the hand-over, every decoder InstanceNorm at weight 1,
    bias 0) and ``stage0_only`` (the encoder and decoder stage 0 only), with
    nnU-Net's own loss (``nnUNetTrainer._build_loss``: DC_and_CE_loss in a DeepSupervisionWrapper),
    optimiser (SGD 1e-2, momentum 0.99, nesterov, weight decay 3e-5; nnU-Net's poly decay per epoch,
    lr (1 - epoch / epochs)^0.9, over the few-label protocol's schedule: ``--poly-iters`` 1,000
    iterations of ``--iters-per-epoch`` 25 by default; 0 keeps the rate constant) and gradient clipping
    (norm 12), on crops through nnU-Net's own training transforms (``nnUNetTrainer.get_training_transforms``
    with the plan's rotation, mirroring and initial patch size; ``--no-augment``: augmentation-free crops
    of the patch size), the same draws for every start (augmentation seeded per iteration). Logged per
    iteration: loss, the gradient L2 norm of each parameter group (before clipping), the fraction of
    pixels predicted foreground and the hard foreground Dice of the batch; per start the share of
    iterations where the clip bites (total norm before clipping > 12).

Usage::

    python pretrain/decoder_diagnosis.py --checkpoint CKPT/checkpoint_final.pth \\
        --preprocessed $nnUNet_preprocessed/Dataset504_Hippocampus \\
        --train-cases hippocampus_001,hippocampus_003,... --val-cases val_cases.txt --out diag/
    python pretrain/decoder_diagnosis.py --checkpoint CKPT --preprocessed DIR \\
        --fewlabel-workdir $nnUNet_results/Dataset504_Hippocampus/macl_fewlabel --budget 4 --fold 0 --out diag/

Writes ``decoder_diagnosis.json``, ``decoder_diagnosis.md`` and (part c) ``decoder_diagnosis_finetune.png``
in ``--out``. CPU-friendly: ``--max-val-slices``, ``--probe-iters``, ``--finetune-iters``; torch uses
``OMP_NUM_THREADS`` threads (``--threads`` overrides).
"""
from __future__ import annotations

import argparse
import os
import sys

from nnunetv2_macl.diagnosis.data import cases_from_fewlabel, parse_case_list
from nnunetv2_macl.diagnosis.finetune import FINETUNE_STARTS
from nnunetv2_macl.diagnosis.networks import START_NAMES
from nnunetv2_macl.diagnosis.run import PARTS, parse_parts, run_diagnosis, set_threads


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint_final.pth of macl_pretrain")
    p.add_argument("--preprocessed", required=True, help="nnU-Net preprocessed dataset folder (plans, dataset.json, data)")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--train-cases", help="file or comma list of the M labeled training cases")
    p.add_argument("--val-cases", help="file or comma list of the validation cases")
    p.add_argument("--fewlabel-workdir", help="instead of the case lists: a macl_fewlabel workdir (with --budget, --fold)")
    p.add_argument("--budget", type=int, default=4)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"which parts to run (comma list of {', '.join(PARTS)}; or E1..E4: E1=e1, E2=c, E3=b, E4=a)")
    p.add_argument("--max-val-slices", type=int, default=None, help="cap on validation slices (evenly spaced per case)")
    p.add_argument("--probe-iters", type=int, default=300)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--probe-batch", type=int, default=16)
    p.add_argument("--probe-loss", choices=["ce", "ce+dice"], default="ce+dice")
    p.add_argument("--finetune-iters", type=int, default=150, help="part (c) / E2: iterations per start")
    p.add_argument("--finetune-batch", type=int, default=32)
    p.add_argument("--poly-iters", type=int, default=1000,
                   help="part (c): the schedule nnU-Net's poly decay spans (the few-label protocol's 1,000; 0: constant lr)")
    p.add_argument("--iters-per-epoch", type=int, default=25, help="part (c): iterations per epoch of that schedule")
    p.add_argument("--starts", default=",".join(FINETUNE_STARTS),
                   help=f"part (c): the starts to fine-tune (comma list of {', '.join(START_NAMES)})")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="part (c): nnU-Net's training transforms on the crops (default); --no-augment: crops as they are")
    p.add_argument("--no-finetune-eval", action="store_true", help="skip the validation Dice after part (c)")
    p.add_argument("--chunk", type=int, default=32, help="slices per forward pass")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run :func:`nnunetv2_macl.diagnosis.run.run_diagnosis`; 2 on a usage error."""
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    if args.fewlabel_workdir:
        train_ids, val_ids = cases_from_fewlabel(args.fewlabel_workdir, args.budget, args.fold)
        if args.train_cases:
            train_ids = parse_case_list(args.train_cases)
        if args.val_cases:
            val_ids = parse_case_list(args.val_cases)
    elif args.train_cases and args.val_cases:
        train_ids, val_ids = parse_case_list(args.train_cases), parse_case_list(args.val_cases)
    else:
        print("error: give --train-cases and --val-cases, or --fewlabel-workdir with --budget and --fold", file=sys.stderr)
        return 2
    try:
        parts = parse_parts(args.parts)
    except ValueError as e:
        print(f"error: --parts: {e}", file=sys.stderr)
        return 2
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    if not starts or set(starts) - set(START_NAMES):
        print(f"error: --starts must list some of {', '.join(START_NAMES)}, got {args.starts!r}", file=sys.stderr)
        return 2
    result = run_diagnosis(args.checkpoint, args.preprocessed, train_ids, val_ids, args.out, args.configuration,
                           args.plans, args.seed, parts, args.max_val_slices, args.probe_iters, args.probe_lr,
                           args.probe_batch, args.probe_loss == "ce+dice", args.finetune_iters, args.finetune_batch,
                           not args.no_finetune_eval, args.chunk, not args.no_plot, print, args.poly_iters,
                           args.iters_per_epoch, starts, args.augment)
    print("\n".join(result["findings"]))
    print(f"written to {os.path.abspath(args.out)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
