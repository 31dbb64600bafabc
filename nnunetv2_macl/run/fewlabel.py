"""``macl_fewlabel -d ID``: how many labeled cases does a dataset need, and what does pretraining add?

The few-label protocol (:mod:`nnunetv2_macl.fewlabel`) on any nnU-Net dataset that is planned and
preprocessed with labels: a fixed set of held-out validation cases, nested training budgets M drawn from
the rest (several folds = several draws), nnU-Net fine-tuned from scratch and from MACL/PCL/SimCLR
pretraining with identical splits, seeds and schedule. Writes tables, CSV, a Dice-vs-M plot and learning
curves under ``$nnUNet_results/DatasetXXX_Name/macl_fewlabel/`` (the dataset's own folders are only
read: the protocol's splits live in a view beside its results)::

    macl_fewlabel -d 4 --budgets 4,10,20 --folds 2 --methods scratch,macl:rescale@encoder  # nnUNetTrainerMACL's start
    macl_fewlabel -d 4 --methods scratch,macl@encoder,macl,pcl --resume             # add arms later
    macl_fewlabel -d 4 --report-only
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnunetv2_macl.errors import USER_ERRORS, UsageError
from nnunetv2_macl.fewlabel.settings import RECIPES, Settings, validate

DEFAULTS = dict(budgets=(4, 10, 20), folds=2, methods=("scratch", "macl:rescale@encoder"), recipe="stock", split="heldout", n_val=40,
                pretrain_epochs=10, pretrain_batch_size=16, pretrain_workers=2, finetune_epochs=50, iters=100,
                val_iters=10, finetune_batch_size=None, save_every=5, jobs=1, overlay_cases=3)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the protocol, shared with ``pretrain/fewlabel_benchmark.py`` (None = the default)."""
    g = p.add_argument_group("protocol")
    g.add_argument("--budgets", type=_ints, help="labeled training cases M, e.g. 4,10,20")
    g.add_argument("--folds", type=int, help="draws of the training sets over the same validation cases")
    g.add_argument("--methods", type=_names,
                   help="arms: scratch, macl, pcl, simclr, each optionally :stock or :warmup (e.g. macl:warmup; a pretrained "
                        "method also :protect or :rescale) and, for "
                        "a pretrained method, @encoder to transfer its encoder only (e.g. macl:rescale@encoder, what "
                        "nnUNetTrainerMACL does; plain macl is the paper's hand-over with the decoder stages); "
                        "plain scratch is nnU-Net's stock recipe, a plain pretrained method takes --recipe; ~E last "
                        "starts from the pretraining's snapshot at epoch E (e.g. macl@encoder~16, with "
                        "--pretrain-extra \"--keep-epochs 16\"): the pretraining-length curve")
    g.add_argument("--recipe", choices=list(RECIPES), help="fine-tuning recipe of plain pretrained methods")
    g.add_argument("--val-cases", "--max-val-cases", dest="n_val", type=int, help="validation cases held out from every training set")
    g.add_argument("--split", choices=["heldout", "kfold"],
                   help="heldout (default: one fixed validation set) or kfold (earlier benchmark: fold f validates on "
                        "part f of nnU-Net's K-fold partition, --val-cases caps it)")
    g.add_argument("--n-splits", type=int, help="kfold: K")
    g.add_argument("--pretrain-on-all", action="store_true", default=None,
                   help="pretraining also sees the validation cases' images (as the paper did; default: excluded)")
    g.add_argument("--seed", type=int)
    s = p.add_argument_group("schedule")
    s.add_argument("--pretrain-epochs", type=int)
    s.add_argument("--pretrain-batch-size", type=int)
    s.add_argument("--pretrain-workers", type=int, help="data loading processes of each pretraining")
    s.add_argument("--pretrain-extra", metavar="ARGS",
                   help="more macl_pretrain options for every pretraining of the workdir, one quoted string, e.g. "
                        "--pretrain-extra \"--lr 0.01 --global-pooling avg\" (a single option: "
                        "--pretrain-extra=--two-stage); checked with macl_pretrain's parser before anything runs, "
                        "part of the pretrainings' fingerprint (--resume redoes what they change)")
    s.add_argument("--epochs", "--finetune-epochs", dest="finetune_epochs", type=int, help="fine-tuning epochs")
    s.add_argument("--iters", type=int, help="training iterations per fine-tuning epoch")
    s.add_argument("--val-iters", type=int, help="validation iterations per epoch (pseudo-Dice of the curves)")
    s.add_argument("--batch-size", "--finetune-batch-size", dest="finetune_batch_size", type=int,
                   help="fine-tuning batch size (default: the plans', stock nnU-Net)")
    s.add_argument("--warmup-epochs", type=int, help="warm-up recipe: epochs of linear warm-up (default 5 %%)")
    s.add_argument("--warmup-peak-lr", type=float,
                   help="warm-up and protect recipes: peak learning rate (default 1e-3 warm-up, 1e-2 protect)")
    s.add_argument("--freeze-epochs", type=int,
                   help="protect recipe: epochs with the pretrained parts frozen while the new parts warm up "
                        "(default 15 %%; 0 = none)")
    s.add_argument("--pretrained-lr-factor", type=float,
                   help="protect recipe: learning rate of the pretrained parts x this factor (default 1)")
    s.add_argument("--save-every", type=int, help="nnU-Net checkpoint every K epochs (what --resume continues from)")
    r = p.add_argument_group("running")
    r.add_argument("--device", choices=["cpu", "cuda"])
    r.add_argument("--jobs", type=int, help="pretrainings/trainings at a time")
    r.add_argument("--procs", type=int, help="nnU-Net worker processes per run")
    r.add_argument("--deadline-min", type=float, help="start no run after this many minutes, counted from the command's start (listed as cut); "
                   "0 starts none: stage, reuse what fits (--resume) and rebuild the report with these settings")
    r.add_argument("--hard-deadline-min", type=float, help="stop runs still going at this many minutes")
    r.add_argument("--overlay-cases", type=int)
    r.add_argument("--resume", action="store_true",
                   help="reuse finished pretrainings/trainings whose settings and cases are unchanged and continue "
                        "unfinished ones from their last checkpoint")
    r.add_argument("--report-only", action="store_true", help="only rebuild the report from the files")


_FIELDS = ("budgets", "folds", "methods", "recipe", "n_val", "split", "n_splits", "pretrain_on_all", "seed",
           "pretrain_epochs", "pretrain_batch_size", "pretrain_workers", "pretrain_extra", "finetune_epochs", "iters",
           "val_iters", "finetune_batch_size", "warmup_epochs", "warmup_peak_lr", "freeze_epochs",
           "pretrained_lr_factor", "save_every", "device", "jobs",
           "procs", "deadline_min", "hard_deadline_min", "overlay_cases")


def settings_from_args(args: argparse.Namespace, base: dict) -> Settings:
    """``base`` (a profile or the defaults) with every option the user gave on top; validated."""
    d = dict(base)
    d.update({k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None})
    s = Settings.from_dict(d)
    validate(s)
    return s


def build_parser() -> argparse.ArgumentParser:
    defaults = ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in DEFAULTS.items())
    p = argparse.ArgumentParser(prog="macl_fewlabel", description=__doc__.split("\n\n")[0],
                                epilog=f"Defaults of the protocol options: {defaults}; device cuda when available "
                                       f"(None = the plans' batch size / nnU-Net's default).")
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or name (planned and preprocessed)")
    p.add_argument("-c", dest="configuration", default="2d", help="nnU-Net configuration")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-o", "--out", help="output folder (default $nnUNet_results/DatasetXXX_Name/macl_fewlabel)")
    add_protocol_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from nnunetv2_macl.fewlabel.report import print_summary, write_report
    from nnunetv2_macl.fewlabel.runner import run_protocol
    from nnunetv2_macl.run.pretrain import resolve_dataset_name

    args = build_parser().parse_args(argv)
    try:
        name = resolve_dataset_name(args.dataset)
        results = os.environ.get("nnUNet_results")
        if not args.out and not results:
            raise UsageError("nnUNet_results is not set; set it as for nnU-Net or pass --out")
        out = Path(args.out or Path(results) / name / "macl_fewlabel")
        if args.report_only:
            print_summary(write_report(out))
            return 0
        source = Path(os.environ["nnUNet_preprocessed"]) / name
        raw = Path(os.environ["nnUNet_raw"]) / name if os.environ.get("nnUNet_raw") else None
        base = dict(DEFAULTS, dataset_id=int(name[7:10]), configuration=args.configuration, plans=args.plans,
                    source={"preprocessed": str(source.resolve())},
                    device="cuda" if _cuda() else "cpu", profile="macl_fewlabel")
        s = settings_from_args(args, base)
        result = run_protocol(out, s, name, source, raw if raw is not None and raw.is_dir() else None,
                              resume=args.resume)
    except USER_ERRORS as e:
        print(f"macl_fewlabel: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("macl_fewlabel: interrupted (--resume continues)", file=sys.stderr, flush=True)
        return 130
    print_summary(result)
    return 1 if any(r["status"] == "failed" for r in result["run_log"]) else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
