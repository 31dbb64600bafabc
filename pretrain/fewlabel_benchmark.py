"""Few-label benchmark on Task04_Hippocampus (or the embedded synthetic data): ``macl_fewlabel``'s
protocol on a dataset this script stages itself in ``--workdir`` (the user's nnU-Net folders are never
touched). Thin: profiles and data staging here; splits, runs, report in :mod:`nnunetv2_macl.fewlabel`.

Profiles (every setting can be overridden with the options of ``macl_fewlabel``):

- ``cpu-smoke``: 12 synthetic cases of 16x32x32, 4 held out for validation, M in {2, 4}, scratch + MACL,
  1 pretraining epoch, 2 x 4 fine-tuning iterations: the pipeline and the tables in minutes, not the gain.
- ``cpu-converge``: Hippocampus on 2 CPU cores, the protocol run to a plateau: 40 validation cases held
  out of every training set and of the pretraining, M in {4, 20}, 2 folds (draws), scratch, MACL (as the
  paper transfers it, and ``macl@encoder``), PCL, SimCLR, 80 epochs x 25 iterations of batch 32 (2,000
  iterations; measured ~0.5 s per iteration on 2 idle cores, so ~20 min per training with its
  validation), 2 pretraining epochs of batch 16 (~4-5 min per method). Start with ``--methods scratch``
  to check the plateau on scratch's own curves.
- ``cpu-real``: today's CPU look at the real data, kept so its rows can be rerun comparably: fold 0 of
  nnU-Net's 5-fold partition (10 of its validation cases), M in {4, 10, 20}, scratch + MACL, 1 pretraining
  epoch of batch 16 on all cases, 25 x 10 fine-tuning iterations of batch 32.
- ``gpu``: Hippocampus on one GPU (``pretrain/run_gpu_benchmark.sh``): 5-fold partition, M in
  {4, 10, 20}, all four methods, 10 pretraining epochs of batch 64, 15 x 20 iterations of the plans'
  batch, 4 runs at a time, deadlines 5.5 / 7.5 min.

Usage (default workdir ``work_dirs/fewlabel_<profile>``; the report is in ``<workdir>/fewlabel/report``)::

    python pretrain/fewlabel_benchmark.py --profile cpu-smoke
    nohup python pretrain/fewlabel_benchmark.py --profile cpu-converge --methods scratch --resume > conv.log 2>&1 &
    python pretrain/fewlabel_benchmark.py --profile cpu-converge --resume     # all methods, scratch reused
    python pretrain/fewlabel_benchmark.py --profile cpu-converge --report-only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nnunetv2_macl.errors import USER_ERRORS, FewLabelError
from nnunetv2_macl.fewlabel.report import print_summary, write_report
from nnunetv2_macl.fewlabel.runner import run_protocol
from nnunetv2_macl.fewlabel.splits import write_json
from nnunetv2_macl.run.fewlabel import add_protocol_arguments, settings_from_args
from nnunetv2_macl.run.subprocess_steps import temporary_environ

_HIPPOCAMPUS = dict(data="msd", dataset_id=504, configuration="2d", plans="nnUNetPlans")
PROFILES: dict[str, dict] = {
    "cpu-smoke": dict(data="synthetic", num_cases=12, shape=(16, 32, 32), dataset_id=981, split="heldout", n_val=4,
                      budgets=(2, 4), folds=1, methods=("scratch", "macl"), pretrain_epochs=1, pretrain_batch_size=8,
                      finetune_epochs=2, iters=4, val_iters=1, save_every=1, device="cpu", jobs=2, procs=1,
                      pretrain_workers=0, overlay_cases=2),
    "cpu-converge": dict(_HIPPOCAMPUS, split="heldout", n_val=40, budgets=(4, 20), folds=2,
                         methods=("scratch", "macl", "macl@encoder", "pcl", "simclr"), pretrain_epochs=2,
                         pretrain_batch_size=16,
                         finetune_epochs=80, iters=25, val_iters=10, finetune_batch_size=32, save_every=5,
                         device="cpu", jobs=1, pretrain_workers=0, overlay_cases=3),
    "cpu-real": dict(_HIPPOCAMPUS, split="kfold", n_splits=5, n_val=10, pretrain_on_all=True, budgets=(4, 10, 20),
                     folds=1, methods=("scratch", "macl"), pretrain_epochs=1, pretrain_batch_size=16,
                     finetune_epochs=25, iters=10, val_iters=2, finetune_batch_size=32, device="cpu", jobs=1,
                     pretrain_workers=0, overlay_cases=3),
    "gpu": dict(_HIPPOCAMPUS, split="kfold", n_splits=5, n_val=None, pretrain_on_all=True, budgets=(4, 10, 20),
                folds=5, methods=("scratch", "macl", "pcl", "simclr"), pretrain_epochs=10, pretrain_batch_size=64,
                finetune_epochs=15, iters=20, val_iters=5, device="cuda", jobs=4, pretrain_workers=3,
                deadline_min=5.5, hard_deadline_min=7.5, overlay_cases=3),
}
STAGED = "fewlabel_benchmark.json"


def default_raw() -> str | None:
    """``$MACL_GPU_DATA`` (the GPU kit), else ``../shared/data/Task04_Hippocampus`` beside the repository."""
    for cand in (os.environ.get("MACL_GPU_DATA"), Path(__file__).resolve().parents[2] / "shared/data/Task04_Hippocampus"):
        if cand and (Path(cand) / "dataset.json").is_file():
            return str(Path(cand).resolve())
    return None


def stage_dataset(workdir: Path, profile: dict, raw: str | None) -> str:
    """The dataset in ``workdir/nnUNet_raw``, planned and preprocessed into ``workdir/nnUNet_preprocessed``
    (once: a later call with the same source reuses it); returns its name."""
    from nnunetv2_macl.demo.synthetic import make_synthetic_dataset, plan_and_preprocess
    from nnunetv2_macl.fewlabel.msd import convert_msd

    source = {"data": profile["data"], "raw": raw, "num_cases": profile.get("num_cases"),
              "shape": list(profile.get("shape", ())), "dataset_id": profile["dataset_id"]}
    marker = workdir / STAGED
    if marker.is_file() and json.loads(marker.read_text()).get("source") == source:
        return json.loads(marker.read_text())["name"]
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.is_file():
        raise FewLabelError(f"--workdir {workdir} is not empty and was not made by this benchmark (no {STAGED})")
    nproc = max(1, int(os.environ.get("nnUNet_def_n_proc", "2")))
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "fewlabel"):
        if (workdir / sub).is_dir():
            import shutil

            shutil.rmtree(workdir / sub)
        (workdir / sub).mkdir(parents=True)
    if profile["data"] == "synthetic":
        make_synthetic_dataset(os.environ["nnUNet_raw"], dataset_id=profile["dataset_id"], name="FewLabelSynthetic",
                               num_cases=profile["num_cases"], shape=tuple(profile["shape"]), seed=0)
        name = f"Dataset{int(profile['dataset_id']):03d}_FewLabelSynthetic"
    else:
        if not raw:
            raise FewLabelError("this profile needs --raw (a Decathlon folder, e.g. ../shared/data/Task04_Hippocampus)")
        name = convert_msd(raw, profile["dataset_id"], workdir / "msd_staging", nproc)
    plan_and_preprocess(int(profile["dataset_id"]), configurations=(profile["configuration"],), num_processes=nproc)
    write_json(marker, {"source": source, "name": name})
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewlabel_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu-smoke")
    p.add_argument("--workdir", help="everything goes here (default work_dirs/fewlabel_<profile>)")
    p.add_argument("--raw", help="Decathlon folder (default $MACL_GPU_DATA or ../shared/data/Task04_Hippocampus)")
    add_protocol_arguments(p)
    args = p.parse_args(argv)
    profile = dict(PROFILES[args.profile], configuration="2d", plans="nnUNetPlans")
    workdir = Path(args.workdir or f"work_dirs/fewlabel_{args.profile.replace('-', '_')}").resolve()
    raw = os.path.abspath(args.raw) if args.raw else (default_raw() if profile["data"] == "msd" else None)
    paths = {"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
             "nnUNet_results": str(workdir / "fewlabel" / "results" / "_unused")}
    cores = str(max(1, min(os.cpu_count() or 1, 8)))
    for var in ("nnUNet_def_n_proc", "nnUNet_n_proc_DA"):  # nnU-Net's defaults assume 8+ cores
        paths[var] = os.environ.get(var) or cores
    try:
        with temporary_environ(paths):
            if args.report_only:
                print_summary(write_report(workdir / "fewlabel"))
                return 0
            base = {k: v for k, v in profile.items() if k not in ("data", "num_cases", "shape")}
            base["profile"] = args.profile
            s = settings_from_args(args, base)
            workdir.mkdir(parents=True, exist_ok=True)
            name = stage_dataset(workdir, profile, raw)
            s.source = json.loads((workdir / STAGED).read_text())["source"]
            result = run_protocol(workdir / "fewlabel", s, name, workdir / "nnUNet_preprocessed" / name,
                                  workdir / "nnUNet_raw" / name, resume=args.resume)
    except USER_ERRORS as e:
        print(f"fewlabel_benchmark: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("fewlabel_benchmark: interrupted (--resume continues)", file=sys.stderr, flush=True)
        return 130
    print_summary(result)
    return 1 if any(r["status"] == "failed" for r in result["run_log"]) else 0


if __name__ == "__main__":
    sys.exit(main())
